"""A Mosquitto bridge from a site's broker to a central one, forwarding exactly a fleet's topics.

Boards connect to their site's broker; the aggregator and the operator to the centre's. The site
broker's bridge sends what devices publish (statuses, updates, deploy reports) out to the centre
and brings what the servers publish (tasks, results, releases, artifact chunks) in. Topics are
never remapped: sealed messages are signed over their topic. On the centre the bridge is a client
like any other, known by the CN of its certificate; `bridge_acl_text` gives that CN exactly the
rights its forwarding needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgefl.errors import InputError
from edgefl.transport import topics

OUT = "out"  # from the site to the centre
IN = "in"  # from the centre to the site
BRIDGE_QOS = 1
DEFAULT_RESTART_S = (1, 30)  # first retry, longest retry (Mosquitto's restart_timeout backoff)


@dataclass(frozen=True)
class BridgedTopic:
    """One topic filter the bridge forwards, and which way."""

    pattern: str
    direction: str  # OUT or IN


@dataclass(frozen=True)
class BridgeTls:
    """The files the bridge presents to the centre: the CA that signed the centre's certificate,
    and the site bridge's own client certificate and key."""

    cafile: Path
    certfile: Path
    keyfile: Path


def bridged_topics(fleet: str) -> list[BridgedTopic]:
    """Return every topic filter of `fleet` that crosses the bridge, with its direction.

    Out: what boards publish (statuses, updates, deploy reports). In: what the aggregator and
    `deploy` publish (tasks, results, releases for the fleet, a group or a device, chunks).
    """
    chunk_filter = f"{topics.fleet_root(fleet)}/models/+/+/chunk/+"
    outgoing = [topics.all_statuses(fleet), topics.all_updates(fleet),
                topics.all_deploy_reports(fleet)]  # fmt: skip
    incoming = [topics.all_tasks(fleet), topics.all_results(fleet),
                *topics.all_release_topics(fleet), chunk_filter]  # fmt: skip
    return [BridgedTopic(p, OUT) for p in outgoing] + [BridgedTopic(p, IN) for p in incoming]


def parse_address(address: str) -> tuple[str, int]:
    """Return (host, port) of "HOST:PORT" (an IPv6 host in brackets: "[::1]:8883").

    Raises:
        InputError: no port, or a port that is not 1-65535.
    """
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"the centre's address must be HOST:PORT, not {address!r}")
    return host, int(port)


def connection_name(fleet: str, bridge_name: str) -> str:
    """Return the bridge's connection name, also its client ID on the centre."""
    return f"edgefl-bridge-{fleet}-{bridge_name}"


def bridge_text(
    fleet: str,
    bridge_name: str,
    centre: str,
    *,
    tls: BridgeTls | None = None,
    restart_s: tuple[int, int] = DEFAULT_RESTART_S,
    keepalive_s: int = 30,
) -> str:
    """Return the Mosquitto bridge section of a site broker's configuration.

    Args:
        fleet: the fleet name.
        bridge_name: the CN of the certificate the bridge presents to the centre (the centre's
            ACL lists it with `bridge_acl_text`); also names the connection.
        centre: the central broker's "HOST:PORT".
        tls: the bridge's TLS files; None connects in plain TCP (a test, a trusted link).
        restart_s: the bridge retries after `restart_s[0]` seconds, backing off to `restart_s[1]`.
        keepalive_s: the bridge's MQTT keepalive.

    Returns:
        Lines to append to a Mosquitto configuration (after its listener).

    Raises:
        InputError: an invalid fleet or bridge name, or a centre address without a port.
    """
    try:
        topics.check_name(bridge_name, "bridge name")
    except ValueError as exc:
        raise InputError(str(exc)) from None
    host, port = parse_address(centre)
    name = connection_name(fleet, bridge_name)
    host_text = f"[{host}]" if ":" in host else host
    lines = [
        f"# Bridge to the centre: devices' topics out, the servers' in (fleet {fleet}).",
        f"connection {name}",
        f"address {host_text}:{port}",
        f"remote_clientid {name}",
        # The centre keeps the bridge's session and queues QoS 1 messages while the link or the
        # site is down; the site queues its devices' messages for the centre the same way.
        "cleansession false",
        "bridge_protocol_version mqttv311",
        # Between Mosquittos the retain flag survives the bridge, so a task or release retained
        # on the centre is retained on the site for boards that connect later.
        "try_private true",
        f"restart_timeout {restart_s[0]} {restart_s[1]}",
        f"keepalive_interval {keepalive_s}",
        # The link's state (1 up, 0 down) on the site's $SYS/broker/connection/NAME/state only:
        # the centre's ACL gives the bridge no $SYS topic.
        "notifications true",
        "notifications_local_only true",
    ]
    if tls is not None:
        lines += [
            f"bridge_cafile {Path(tls.cafile).resolve()}",
            f"bridge_certfile {Path(tls.certfile).resolve()}",
            f"bridge_keyfile {Path(tls.keyfile).resolve()}",
        ]
    # No local or remote prefix: a topic keeps its name across the bridge (seals cover it).
    lines += [f"topic {t.pattern} {t.direction} {BRIDGE_QOS}" for t in bridged_topics(fleet)]
    return "\n".join(lines) + "\n"


def bridge_acl_text(fleet: str, bridge_names: list[str]) -> str:
    """Return the centre's ACL sections for site bridges: each writes the devices' topics it
    forwards out and reads the topics it forwards in, of every device (a bridge speaks for its
    whole site; seals, not the ACL, say which device a message is from).

    Args:
        fleet: the fleet name.
        bridge_names: the CNs of the site bridges' certificates.
    """
    lines: list[str] = []
    for name in bridge_names:
        lines += ["", f"user {name}"]
        lines += [
            f"topic {'write' if t.direction == OUT else 'read'} {t.pattern}"
            for t in bridged_topics(fleet)
        ]
    return "\n".join(lines) + ("\n" if lines else "")
