"""What a board says about itself: the retained status an agent publishes (`DeviceStatus`)."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass

from edgefl.roles.agent_config import AgentConfig
from edgefl.roles.features import installed_runtimes
from edgefl.transport.messages import DeviceStatus


@dataclass(frozen=True)
class RunningBackbone:
    """The backbone a board runs: its artifact file, runtime and execution provider."""

    artifact: str
    runtime: str
    provider: str = ""


def memory_mb() -> int:
    """Return the board's physical memory in MiB (0 when the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20))
    except (ValueError, OSError, AttributeError):
        return 0


def board_status(
    config: AgentConfig,
    state: str,
    samples: int,
    model_version: int,
    last_round: int,
    bundle_digest: str,
    running: RunningBackbone | None,
    connected_at: float = 0.0,
) -> DeviceStatus:
    """Build the status an agent publishes.

    Args:
        config: the agent's settings (device ID, task, group, profile, heartbeat).
        state: "online" or "offline".
        samples: local labelled samples it trains on (0 on a board with no data yet, which the
            aggregator then does not select).
        model_version: the installed bundle's version (0 for none).
        last_round: the last round it answered (0 for none).
        bundle_digest: the installed bundle's digest ("" for none).
        running: the backbone it runs, None before one is loaded.
        connected_at: when the connection it goes out on was opened (its last will's too).

    Returns:
        The status, stamped with the current time.
    """
    return DeviceStatus(
        device_id=config.device_id,
        state=state,
        task=config.task,
        arch=platform.machine(),
        runtimes=installed_runtimes(),
        memory_mb=memory_mb(),
        samples=samples,
        model_version=model_version,
        heartbeat_s=config.heartbeat_s,
        time=time.time(),
        group=config.group,
        profile=config.profile,
        last_round=last_round,
        bundle_digest=bundle_digest,
        artifact=running.artifact if running else "",
        runtime=running.runtime if running else "",
        provider=running.provider if running else "",
        mac_key=config.auth.mac_public if config.auth is not None else "",
        connected_at=connected_at,
    )
