"""Simulated boards of one process open each task once between them (`SharedTasks`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from bundles import make_test_bundle

from edgefl.core.settings import RoundPolicy
from edgefl.head import Weights
from edgefl.roles.agent import Agent
from edgefl.simulation.runner import Simulation, SimulationConfig
from edgefl.simulation.shared_tasks import Roster, SharedTasks
from edgefl.simulation.workload import load_federated_data
from edgefl.transport import topics
from edgefl.transport.client import Message
from edgefl.transport.memory import MemoryBroker, MemoryClient
from edgefl.transport.messages import RoundTask
from edgefl.transport.sealed import SealError


def test_boards_share_one_opened_task_and_count_refusals_each(tmp_path: Path) -> None:
    agents: list[Agent] = []
    seen: list[tuple[str, int, int, bool]] = []  # device, round, id of the heads, writeable
    tasks: list[Message] = []

    def watch(agent: Agent) -> None:
        agents.append(agent)
        handle = agent.handle_task

        def record(task: RoundTask, heads: dict[str, Weights]) -> None:
            writeable = any(a.flags.writeable for w in heads.values() for a in w.values())
            seen.append((agent.device_id, task.round, id(heads), writeable))
            handle(task, heads)

        agent.handle_task = record  # type: ignore[method-assign]

    bundle = make_test_bundle(tmp_path / "bundle")
    with MemoryBroker("shared-tasks") as broker:
        spy = MemoryClient(broker.url, "spy")
        spy.subscribe(topics.all_tasks("sim"), lambda m: tasks.append(m) if m.payload else None)
        spy.connect()
        config = SimulationConfig(devices=3, policy=RoundPolicy(rounds=2), broker_url=broker.url)
        simulation = Simulation(config, bundle, load_federated_data("digits"), prepare_agent=watch)
        metrics = simulation.run()
        spy.close()
    assert [r.reported for r in metrics.rounds] == [3, 3]
    for number in (1, 2):
        heads_seen = {heads for _, round_, heads, _ in seen if round_ == number}
        assert len(heads_seen) == 1  # every board got the one decoded copy
    assert not any(writeable for *_, writeable in seen)  # and could not change it

    # A forged task (one byte of the signed bytes changed) is refused by every board that
    # sees it, each counting it, and never remembered.
    genuine = tasks[0]
    forged = bytearray(genuine.payload)
    forged[-1] ^= 1
    memo = SharedTasks()
    for agent in agents[:2]:
        with pytest.raises(SealError):
            memo.open(agent, Message(genuine.topic, bytes(forged), 1, False))
        assert sum(agent.auth.refused.values()) == 1
    assert memo.open(agents[0], genuine)[0].round == 1
    assert memo.open(agents[1], genuine)[1] is memo.open(agents[2], genuine)[1]


def test_a_roster_is_the_selected_list_with_set_membership() -> None:
    roster = Roster([f"d{i}" for i in range(10_000)])
    assert "d9999" in roster and "d10000" not in roster and 5 not in roster
    assert isinstance(roster, list) and roster[3] == "d3" and len(roster) == 10_000
    assert roster == [f"d{i}" for i in range(10_000)]
