"""A real agent in async mode over Mosquitto: tasks that came while it trained are skipped for the
newest one, so a slow board never works through a backlog of stale head versions."""

from __future__ import annotations

from pathlib import Path

from bundles import digits_devices, make_test_bundle
from conftest import RunningBroker, wait_for

from edgefl.core.settings import RoundSettings
from edgefl.head import head_digest
from edgefl.roles.agent import Agent, AgentConfig
from edgefl.transport import topics
from edgefl.transport.client import Message, MqttClient
from edgefl.transport.messages import RoundTask, encode_round_task, read_update_header

FLEET = "async-board"


def test_a_busy_board_trains_on_the_newest_task_it_was_sent(
    mosquitto: RunningBroker, tmp_path: Path
) -> None:
    bundle = make_test_bundle(tmp_path / "b", feature_size=16)
    heads = {"default": bundle.head_weights("default")}
    (data,), _ = digits_devices(1)
    agent = Agent(AgentConfig(mosquitto.url, FLEET, "pi-1", bundle_dir=bundle.path), data)
    updates: list[int] = []
    server = MqttClient(mosquitto.url, "async-server")

    def on_update(message: Message) -> None:
        updates.append(read_update_header(message.payload).round)

    server.subscribe(topics.all_updates(FLEET), on_update)
    server.connect()
    agent.start()
    try:
        # The board is busy training (another round holds its training lock) while versions
        # 1, 2 and 3 are published, each task selecting it.
        with agent._train_lock:
            for number in (1, 2, 3):
                task = RoundTask(
                    number, ["pi-1"], ["default"], number - 1, bundle.manifest.version, 30.0,
                    RoundSettings().to_wire(), run_id="run-a", head_digest=head_digest(heads),
                    bundle_digest=bundle.digest,
                )  # fmt: skip
                topic = topics.round_task(FLEET, number)
                # Retained, as the aggregator publishes tasks: the agent's subscription may still
                # be on its way to the broker (a loaded machine), and gets them all the same.
                payload = encode_round_task(task, heads)
                server.publish(topic, payload, qos=1, retain=True).wait(5)
            assert wait_for(lambda: len(agent._training) == 3, 30)
        assert wait_for(lambda: len(updates) >= 1, 30)
        assert not wait_for(lambda: len(updates) > 1, 1.0)
    finally:
        agent.stop()
        for number in (1, 2, 3):
            server.publish(topics.round_task(FLEET, number), b"", qos=1, retain=True).wait(5)
        server.close()
    # Rounds 1 and 2 waited behind the training and were superseded: only the newest answered.
    assert updates == [3]
    assert [o.round for o in agent.outcomes] == [3]
