"""A simulated device: the real `Agent`, answering late or not at all as the fleet plan says."""

from __future__ import annotations

from collections.abc import Callable

from edgefl.data import Dataset
from edgefl.head import Weights
from edgefl.roles.agent import Agent, AgentConfig
from edgefl.roles.features import FeatureCache
from edgefl.simulation.shared_tasks import SHARED_TASKS
from edgefl.transport.client import Message, NetworkLoop
from edgefl.transport.messages import RoundTask

# Round number -> None (skip the round: a dropout) or seconds to delay the update (a slow board).
ReplyDecision = Callable[[int], float | None]


class SimulatedAgent(Agent):
    """An `Agent` whose answers a `ReplyDecision` drops or delays; everything else is real."""

    def __init__(
        self,
        config: AgentConfig,
        reply: ReplyDecision,
        dataset: Dataset | None = None,
        network: NetworkLoop | None = None,
        feature_cache: FeatureCache | None = None,
    ) -> None:
        """Configure the agent (see `Agent`); `reply` decides, per round, whether and when."""
        super().__init__(config, dataset=dataset, network=network, feature_cache=feature_cache)
        self.reply = reply
        # The simulation's aggregator reports every answer itself; a thousand agents each
        # subscribing to every round's result would only add broker traffic.
        self.reads_results = False

    def open_task(self, message: Message) -> tuple[RoundTask, dict[str, Weights]]:
        """Verify and decode a task once for every simulated board of the process that trusts
        the same keys (`edgefl.simulation.shared_tasks`), not once per board."""
        return SHARED_TASKS.open(self, message)

    def handle_task(self, task: RoundTask, heads: dict[str, Weights]) -> None:
        """Skip the round, or answer it and publish the update when trained or after the delay."""
        # Decided before training, so a simulated dropout costs nothing and a slow device's
        # update is the one it would have sent on time.
        delay = self.reply(task.round)
        if delay is None:
            return
        # Trained here, on the network thread that drives every simulated board: a simulated
        # head trains in about a millisecond, and handing a thousand of them to the training
        # pool and back cost more in thread switches than the training itself (FL-digits
        # 100 x 10: +15% wall time). A real board trains on the pool so its heartbeats go on.
        payload = self.answer(task, heads)
        if delay <= 0:
            self.publish_update(task, payload)
            return
        # The network thread must not sleep, so the update is published by a timer.
        self.client.network.call_later(delay, lambda: self.publish_update(task, payload))
