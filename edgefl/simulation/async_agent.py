"""A simulated device for async (FedBuff) runs: busy while it trains, then on the newest task.

In async mode the aggregator publishes a task for every new head version, so a slow board sees
several while it trains. A real board trains on its pool one task at a time; this simulated one
models its speed: a task it takes keeps it busy for its delay (`SimulatedAgent`'s
`ReplyDecision`), tasks arriving meanwhile replace one another, and when it has published it
takes the newest of them. A dropout skips that head version and waits for the next task.
"""

from __future__ import annotations

import threading
from typing import Any

from edgefl.head import Weights
from edgefl.simulation.simulated_agent import SimulatedAgent
from edgefl.transport.messages import RoundTask


class AsyncSimulatedAgent(SimulatedAgent):
    """A `SimulatedAgent` that answers one task at a time, always the newest it has."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Configure the agent (the arguments of `SimulatedAgent`)."""
        super().__init__(*args, **kwargs)
        self._busy = False
        self._waiting: tuple[RoundTask, dict[str, Weights]] | None = None
        self._state = threading.Lock()

    def handle_task(self, task: RoundTask, heads: dict[str, Weights]) -> None:
        """Take the task now when idle; else keep it if it is newer than the one waiting."""
        with self._state:
            if self._busy:
                if self._waiting is None or task.round > self._waiting[0].round:
                    self._waiting = (task, heads)
                return
            self._busy = True
        self._take(task, heads)

    def _take(self, task: RoundTask, heads: dict[str, Weights]) -> None:
        delay = self.reply(task.round)
        if delay is None:  # dropped out of this head version
            self._next()
            return
        # Trained at once on the network thread (see SimulatedAgent.handle_task); the delay
        # stands for the board's slower training, and the board stays busy through it.
        payload = self.answer(task, heads)

        def publish() -> None:
            if not self._stopped.is_set():
                self.publish_update(task, payload)
            self._next()

        self.client.network.call_later(max(0.0, delay), publish)

    def _next(self) -> None:
        if self._stopped.is_set():
            return
        with self._state:
            waiting, self._waiting = self._waiting, None
            self._busy = waiting is not None
        if waiting is not None:
            self._take(*waiting)
