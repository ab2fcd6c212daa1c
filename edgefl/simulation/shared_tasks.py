"""One signature check and one decode per task for every simulated board of a process.

A real board verifies and decodes each task once. A simulation runs thousands of boards in one
process, all receiving the same bytes and trusting the same keys: checking the signature and
parsing the task (its `selected` list grows with the fleet) for each of them would be the same
work thousands of times, O(devices²) per round. `SharedTasks` does it once per distinct task
and hands every board the same result; the heads are made read-only, so a board that tried to
train in place would fail loudly instead of changing its neighbours' copy.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Hashable

from edgefl.head import Weights
from edgefl.roles.agent import Agent
from edgefl.transport.client import Message
from edgefl.transport.messages import RoundTask

Opened = tuple[RoundTask, dict[str, Weights]]


class Roster(list[str]):
    """A task's `selected` list that answers `device in selected` from a set: every board asks
    it once per task, and on a list of 10,000 IDs that is 10,000² comparisons a round."""

    def __init__(self, devices: list[str]) -> None:
        super().__init__(devices)
        self._members = frozenset(devices)

    def __contains__(self, device: object) -> bool:
        return device in self._members


class SharedTasks:
    """A small memo of opened tasks, keyed by what the result depends on: the keys the board
    trusts, the topic and the exact bytes. Only successes are kept, so a refusal is counted by
    every board that sees it (`AgentAuth.refused`)."""

    def __init__(self, keep: int = 8) -> None:
        """Args:
        keep: how many distinct tasks to remember (a run has one open at a time; retained
            re-deliveries and async head versions need a few more).
        """
        self.keep = keep
        self._opened: OrderedDict[tuple[Hashable, str, bytes], Opened] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, agent: Agent, message: Message) -> Opened:
        """Return `agent`'s opened task, verifying and decoding it only when no board with the
        same trust has opened these bytes on this topic before.

        Raises:
            SealError, MessageError: as `Agent.open_task`.
        """
        trusted = agent.auth.trusted
        # Insecure boards each hold their own (equal) trust object; what they accept is the same.
        key = ("insecure" if trusted.insecure else trusted, message.topic, message.payload)
        with self._lock:
            found = self._opened.get(key)
            if found is not None:
                self._opened.move_to_end(key)
                return found
        task, heads = Agent.open_task(agent, message)
        task = dataclasses.replace(task, selected=Roster(task.selected))
        for weights in heads.values():
            for array in weights.values():
                array.flags.writeable = False
        with self._lock:
            self._opened[key] = (task, heads)
            while len(self._opened) > self.keep:
                self._opened.popitem(last=False)
        return task, heads


# The process's simulated boards share one memo: they may belong to several simulations, whose
# keys differ, and the key holds the trust object, so they never see each other's tasks.
SHARED_TASKS = SharedTasks()
