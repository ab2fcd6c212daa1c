"""The threads agents train on: one small pool per process, shared by every agent in it.

An agent's handlers run on its network thread, which also sends its heartbeats; training there
would silence the board for as long as a round trains. A simulation runs up to a thousand agents
in one process, so they share a few workers rather than a thread each.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger(__name__)

# Training is numpy on small heads: a few workers keep the cores busy without thrashing them.
MAX_TRAINING_WORKERS = 4

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def training_pool() -> ThreadPoolExecutor:
    """Return the process's training pool, created on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            workers = max(1, min(MAX_TRAINING_WORKERS, os.cpu_count() or 1))
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="edgefl-train")
        return _pool


def run_in_pool(work: Callable[[], None], what: str) -> Future[None]:
    """Run `work` on the training pool; an exception it raises is logged with `what`, not lost.

    Returns:
        The future of the work (tests wait on it; agents need not).
    """

    def logged() -> None:
        try:
            work()
        except Exception:  # a bug: the board keeps running, the log says what failed
            log.exception("%s failed", what)

    return training_pool().submit(logged)
