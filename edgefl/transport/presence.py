"""Whether a device is online: its stated state, and how recently its status was heard.

A device's retained status says "online" until its last will replaces it. The will does not
fire for a board whose TCP connection hangs half-open, nor for a retained status a broker
restored after the device's session vanished; such a status stays "online" forever. So a status
counts only while it is fresh: heard within `STALE_HEARTBEATS` × the heartbeat interval the
device announces (or a fixed `stale_after_s` the reader chooses). Pure functions; the aggregator
and the fleet view share them so both show the same rule.
"""

from __future__ import annotations

from edgefl.transport.messages import DeviceStatus

# Three missed heartbeats: one lost or delayed publish (broker restart, reconnect backoff) must
# not drop a healthy device out of a round's selection.
STALE_HEARTBEATS = 3.0

ONLINE = "online"
OFFLINE = "offline"
STALE = "stale"


def seen_at(status: DeviceStatus, received_at: float, retained: bool) -> float:
    """Return when a status was last known true, as Unix time on the reader's clock.

    A status delivered live was true when it arrived, so the reader's own clock says when and
    the device's clock does not matter. A retained status delivered on subscribe may be hours
    old: only the device's `time` tells, capped at `received_at` so a device clock running ahead
    cannot make it look fresh for longer than one staleness window.

    Args:
        status: the decoded status.
        received_at: the reader's Unix time when the message arrived.
        retained: whether the broker delivered it as a retained message (on subscribe).

    Returns:
        The Unix time the status counts from.
    """
    if retained and status.time > 0:
        return min(status.time, received_at)
    return received_at


def stale_after(status: DeviceStatus, override_s: float | None = None) -> float | None:
    """Return how many seconds a status stays fresh, or None when it never goes stale.

    Args:
        status: the decoded status.
        override_s: a fixed window chosen by the reader (e.g. `edgefl aggregate --stale-after`);
            it applies to every device, also those that announce no heartbeat.

    Returns:
        `override_s` when given, else `STALE_HEARTBEATS` × `status.heartbeat_s`; None when
        neither is set (a device that announces no heartbeat is judged by its state alone).
    """
    if override_s is not None:
        return override_s
    if status.heartbeat_s > 0:
        return STALE_HEARTBEATS * status.heartbeat_s
    return None


def supersedes(status: DeviceStatus, held: DeviceStatus | None) -> bool:
    """Whether a status received replaces the one held for its device.

    Every status does, but a last will ("offline") of an earlier connection than the one the
    held status went out on: a will a bridge or a restarted broker delivers after the board
    has reconnected says nothing about the board now. Statuses without `connected_at` (0,
    older boards) always replace.
    """
    return not (
        held is not None and status.state == OFFLINE and 0 < status.connected_at < held.connected_at
    )


def presence(
    status: DeviceStatus, last_seen: float, now: float, override_s: float | None = None
) -> str:
    """Return "online", "stale" (says online but was not heard in time) or "offline".

    Args:
        status: the device's latest status.
        last_seen: when it counts from (see `seen_at`), Unix time.
        now: the reader's Unix time.
        override_s: see `stale_after`.
    """
    if status.state != ONLINE:
        return OFFLINE
    window = stale_after(status, override_s)
    if window is not None and now - last_seen > window:
        return STALE
    return ONLINE
