"""`aggregate --workers N` and `edgefl aggregate-worker`: an aggregator's ingest workers.

`aggregate --workers N` starts N `aggregate-worker` processes on this machine (same broker,
fleet, key and TLS files) and coordinates them; `--remote-workers M` also waits for M workers
started elsewhere with `edgefl aggregate-worker`. See `edgefl.roles.coordinator`.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click

from edgefl.cli.auth import INSECURE_HELP
from edgefl.cli.options import tls_options, tls_settings
from edgefl.cli.shell import setup_logging, stop_on_sigterm, user_errors
from edgefl.errors import FederationError

F = TypeVar("F", bound=Callable[..., Any])

# The options of `aggregate` a local worker is started with, as they were given.
_PASSED_ON = (("signing_key", "--signing-key"), ("cafile", "--cafile"), ("certfile", "--cert"),
              ("keyfile", "--key"), ("log_level", "--log-level"))  # fmt: skip


def worker_options(command: F) -> F:
    """Add `--workers`, `--remote-workers` and `--collect-timeout` to `aggregate`."""
    command = click.option(
        "--collect-timeout", "collect_timeout_s", type=float, default=10.0, show_default=True,
        help="Seconds the coordinator waits for a worker's acknowledgement or partial; a "
        "worker later than that loses its share of the round.",
    )(command)  # fmt: skip
    command = click.option(
        "--remote-workers", type=click.IntRange(min=0), default=0, show_default=True,
        help="Also wait for this many workers started elsewhere with `edgefl aggregate-worker`.",
    )(command)  # fmt: skip
    return click.option(
        "--workers", type=click.IntRange(min=0), default=0, show_default=True,
        help="Start this many ingest worker processes here; they share the updates through "
        "MQTT shared subscriptions (a broker with $share: Mosquitto >= 1.6, not `edgefl "
        "broker`). 0 with no --remote-workers: this process takes every update itself.",
    )(command)  # fmt: skip


class WorkerFailed(FederationError):
    """A local ingest worker exited while the federation ran."""


@dataclass
class ScaleOut:
    """The ingest workers of one `aggregate` run."""

    local: int
    remote: int
    collect_timeout_s: float
    argv: list[str] = field(default_factory=list)  # options every local worker gets

    @property
    def expected(self) -> int:
        """How many workers the coordinator waits for (0: none, a single process)."""
        return self.local + self.remote

    @contextlib.contextmanager
    def start_local(
        self, broker_url: str, fleet: str, on_failure: Callable[[], None] | None = None
    ) -> Iterator[None]:
        """Run the local workers for the duration of the block, then stop them.

        A worker that exits before the block ends (e.g. a broker without shared subscriptions)
        calls `on_failure` (to stop the coordinator) and the block raises `WorkerFailed`.

        Raises:
            WorkerFailed: a local worker exited with an error.
        """
        host = socket.gethostname().split(".")[0] or "local"
        command = [sys.executable, "-c", "from edgefl.cli import main; main()",
                   "aggregate-worker", "--broker", broker_url, "--fleet", fleet]  # fmt: skip
        processes = [
            subprocess.Popen([*command, "--worker-id", f"{host}-{index}", *self.argv])
            for index in range(self.local)
        ]
        failed: list[str] = []
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.2):
                for index, process in enumerate(processes):
                    code = process.poll()
                    if code not in (None, 0) and not failed:
                        failed.append(f"ingest worker {host}-{index} exited with status {code}")
                        if on_failure is not None:
                            on_failure()

        watcher = threading.Thread(target=watch, name="edgefl-worker-watch", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join()
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if failed:
                raise WorkerFailed(f"{failed[0]} (its error is above)")


def take_worker_options(options: dict[str, Any], is_async: bool) -> ScaleOut:
    """Take the `worker_options` out of `aggregate`'s keyword arguments (the key, TLS and log
    options stay: local workers get them too).

    Raises:
        click.UsageError: workers asked for in async mode (it runs in one process).
    """
    scale = ScaleOut(options.pop("workers"), options.pop("remote_workers"),
                     options.pop("collect_timeout_s"))  # fmt: skip
    if scale.collect_timeout_s <= 0:
        raise click.BadParameter("must be positive", param_hint="'--collect-timeout'")
    if scale.expected and is_async:
        raise click.UsageError(
            "--workers and --remote-workers work with synchronous rounds only: --mode async "
            "runs in one process"
        )
    for name, flag in _PASSED_ON:
        if options.get(name) is not None:
            scale.argv += [flag, str(options[name])]
    if options.get("insecure"):
        scale.argv.append("--insecure")
    return scale


@click.command("aggregate-worker")
@click.option("--broker", "broker_url", required=True, help="mqtt://HOST[:PORT] or mqtts://...")
@click.option("--fleet", required=True, help="Fleet name.")
@click.option("--worker-id", required=True, help="Unique among the fleet's ingest workers.")
@click.option("--signing-key", type=click.Path(path_type=Path),
              help="The aggregator's key (it seals rounds; workers are part of it) "
              "[~/.config/edgefl/keys/signing.key].")  # fmt: skip
@click.option("--insecure", is_flag=True, help=INSECURE_HELP)
@click.option("--log-level", default="warning", show_default=True)
@tls_options()
@user_errors
def aggregate_worker(**options: Any) -> None:
    """Run one ingest worker of `edgefl aggregate --workers/--remote-workers` (any machine)."""
    from edgefl import signing
    from edgefl.roles.ingest_worker import IngestWorker, IngestWorkerConfig

    tls = tls_settings(options)
    setup_logging(options["log_level"])
    key = None
    if options["insecure"]:
        click.echo("WARNING: the ingest worker runs --insecure: messages are neither signed nor "
                   "checked", err=True)  # fmt: skip
    else:
        path = options["signing_key"] or signing.DEFAULT_KEY_DIR / signing.PRIVATE_KEY_FILE
        path = Path(path).expanduser()
        if not path.exists():
            raise click.UsageError(f"no signing key at {path}: give the aggregator's "
                                   "--signing-key, or run --insecure")  # fmt: skip
        key = signing.load_private_key(path)
    config = IngestWorkerConfig(options["broker_url"], options["fleet"], options["worker_id"],
                                key, tls)  # fmt: skip
    try:
        worker = IngestWorker(config)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    stop_on_sigterm(worker.stop)
    click.echo(f"ingest worker {config.worker_id} of fleet {config.fleet} at "
               f"{config.broker_url}", err=True)  # fmt: skip
    worker.run_forever()
