"""How a board learns what became of its update: it reads the result of each round it answered.

`ResultWatch` decides which result topics a board listens on and what a result tells it; the
agent passes in how to subscribe, unsubscribe and record, so this module does no I/O. A result
of another run (a retained one of an earlier run with the same round number) is ignored.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

from edgefl.errors import MessageError
from edgefl.transport.client import Message
from edgefl.transport.messages import RoundResult
from edgefl.transport.sealed import SealError

log = logging.getLogger(__name__)

# The answer recorded when a result does not list the device (an update that came late, or an
# aggregator older than protocol v2).
UNLISTED = "unknown"
# Records (round, run ID, answer, reason) for the device.
Record = Callable[[int, str, str, str], None]


class ResultWatch:
    """The result topics a board waits on, with the run whose result it waits for on each."""

    def __init__(
        self,
        device_id: str,
        subscribe: Callable[[str], None],
        unsubscribe: Callable[[str], None],
        record: Record,
        keep: int,
        open_payload: Callable[[str, bytes], bytes] = lambda _topic, data: data,
    ) -> None:
        """Args:
        device_id: whose answer to read from results.
        subscribe, unsubscribe: start and stop listening on a topic (results come to `receive`).
        record: called with (round, run ID, answer, reason) for each result of an awaited run.
        keep: how many rounds' results are awaited at once; older ones are given up.
        open_payload: checks a result's seal and returns its payload (raises `SealError`).
        """
        self.device_id = device_id
        self._subscribe, self._unsubscribe, self._record = subscribe, unsubscribe, record
        self._keep = keep
        self._open = open_payload
        self._awaiting: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def expect(self, topic: str, run_id: str) -> None:
        """Wait for the result of run `run_id` on `topic` (a round's result topic)."""
        with self._lock:
            known = topic in self._awaiting
            self._awaiting[topic] = run_id
            self._awaiting.move_to_end(topic)
            dropped = []
            while len(self._awaiting) > self._keep:
                dropped.append(self._awaiting.popitem(last=False)[0])
        for old in dropped:
            self._unsubscribe(old)
        if not known:
            self._subscribe(topic)

    def receive(self, message: Message) -> None:
        """Read a result: record this device's answer when it is of the awaited run."""
        if not message.payload:
            return  # a cleared retained result
        try:
            result = RoundResult.decode(self._open(message.topic, message.payload))
        except (MessageError, SealError) as exc:
            log.warning("%s: ignoring bad result on %s: %s", self.device_id, message.topic, exc)
            return
        with self._lock:
            if self._awaiting.get(message.topic) != result.run_id:
                return
            del self._awaiting[message.topic]
        self._unsubscribe(message.topic)
        answer = result.answers.get(self.device_id, UNLISTED)
        reason = result.reasons.get(self.device_id, "")
        self._record(result.round, result.run_id, answer, reason)
        if answer == "accepted":
            log.info("%s: round %d: update accepted", self.device_id, result.round)
        else:
            log.warning("%s: round %d: update not accepted: %s: %s", self.device_id,
                        result.round, answer, reason or "no reason given")  # fmt: skip
