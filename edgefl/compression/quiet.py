"""Keep third-party exporters' and runtimes' log output (TensorFlow, absl, torchao) off stderr.

TFLite export prints about ten lines a run that a user cannot act on: absl's "before
InitializeLog" notice, oneDNN and XNNPACK banners, torchao's optional kernels that do not load
here. Most come from C++ writing to file descriptor 2, past Python's logging and `sys.stderr`,
so only redirecting the descriptor itself silences them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator

# Python loggers of those libraries (torch's pytree warns while torchao registers its types).
NOISY_LOGGERS = ("absl", "tensorflow", "torchao", "torch.utils._pytree", "torch.onnx")


@contextlib.contextmanager
def third_party_quiet(verbose: bool = False) -> Iterator[None]:
    """Discard what is written to stderr (descriptor 2) and the noisy loggers inside the block.

    Our own messages do not go through descriptor 2 inside the block: progress goes to the
    console, errors are raised and reported by the caller after it.

    Args:
        verbose: show everything instead (the block runs untouched).
    """
    if verbose:
        yield
        return
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    # TensorFlow reads this when it is first imported: it then skips its INFO/WARNING lines.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
