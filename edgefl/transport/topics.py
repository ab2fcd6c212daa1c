"""The versioned MQTT topic scheme under `edgefl/v1/{fleet}/` and a pure topic-filter matcher.

Delivery's topics (releases per target, artifact chunks, deploy reports) are built on
`fleet_root` in `edgefl.delivery.topics`.
"""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOL_VERSION = "v1"
ROOT = f"edgefl/{PROTOCOL_VERSION}"

# Characters MQTT gives a meaning to; an ID containing one would break filters or levels.
_RESERVED = ("/", "+", "#", "\x00")


def check_name(value: str, what: str) -> str:
    """Return `value` when it can be one topic level (fleet, device ID, task).

    Raises:
        ValueError: the name is empty, too long, or contains `/`, `+`, `#` or NUL.
    """
    if not value or len(value) > 128 or any(ch in value for ch in _RESERVED):
        raise ValueError(f"{what} {value!r} must be 1-128 characters without '/', '+', '#' or NUL")
    return value


def fleet_root(fleet: str) -> str:
    """Return the prefix every topic of a fleet starts with (no trailing slash)."""
    return f"{ROOT}/{check_name(fleet, 'fleet')}"


def device_status(fleet: str, device_id: str) -> str:
    """Return a device's status topic (retained; the last will publishes "offline" here)."""
    return f"{fleet_root(fleet)}/devices/{check_name(device_id, 'device ID')}/status"


def model_current(fleet: str) -> str:
    """Return the topic of the fleet's current (signed) manifest, retained."""
    return f"{fleet_root(fleet)}/models/current"


def round_task(fleet: str, round_number: int) -> str:
    """Return the topic of round `round_number`'s task (retained while the round is open)."""
    return f"{fleet_root(fleet)}/rounds/{int(round_number)}/task"


def round_update(fleet: str, round_number: int, device_id: str) -> str:
    """Return the topic a device publishes its update for a round on."""
    device = check_name(device_id, "device ID")
    return f"{fleet_root(fleet)}/rounds/{int(round_number)}/update/{device}"


def round_result(fleet: str, round_number: int) -> str:
    """Return the topic of a round's result (retained)."""
    return f"{fleet_root(fleet)}/rounds/{int(round_number)}/result"


def all_statuses(fleet: str) -> str:
    """Return the filter matching every device's status topic."""
    return f"{fleet_root(fleet)}/devices/+/status"


def all_tasks(fleet: str) -> str:
    """Return the filter matching every round's task topic."""
    return f"{fleet_root(fleet)}/rounds/+/task"


def all_results(fleet: str) -> str:
    """Return the filter matching every round's result topic."""
    return f"{fleet_root(fleet)}/rounds/+/result"


def all_updates(fleet: str) -> str:
    """Return the filter matching every update of every round."""
    return f"{fleet_root(fleet)}/rounds/+/update/+"


# The prefix of a shared subscription's filter: `$share/{group}/{filter}`.
SHARED_PREFIX = "$share/"


def matches(topic_filter: str, topic: str) -> bool:
    """Return whether `topic` matches the MQTT filter `topic_filter` (`+` one level, `#` rest).

    Follows MQTT 3.1.1 section 4.7: `#` also matches the parent level (`a/#` matches `a`), and
    filters starting with a wildcard do not match topics starting with `$`. A shared
    subscription `$share/{group}/{filter}` (MQTT 5, and Mosquitto for 3.1.1 clients) matches what
    its `{filter}` matches: the broker delivers each message to one member of the group.
    """
    if topic_filter.startswith(SHARED_PREFIX):
        topic_filter = topic_filter.split("/", 2)[2] if topic_filter.count("/") >= 2 else ""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return index == len(filter_levels) - 1
        if index >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(filter_levels) == len(topic_levels)


@dataclass(frozen=True)
class ParsedTopic:
    """What an edgefl topic names. Fields that the kind does not use are None."""

    fleet: str
    kind: str  # "status", "deploy_report", "model_current", "task", "update", "result"
    device_id: str | None = None
    round_number: int | None = None


def _int_level(text: str) -> int | None:
    # 18 digits always fit an int64 (SQLite's INTEGER): a longer "round" is noise, not a round.
    return int(text) if text.isdigit() and len(text) < 19 else None


def parse(topic: str) -> ParsedTopic | None:
    """Return what an edgefl topic names, or None when it is not one of the scheme's topics."""
    levels = topic.split("/")
    if len(levels) < 4 or levels[0] != "edgefl" or levels[1] != PROTOCOL_VERSION:
        return None
    fleet, rest = levels[2], levels[3:]
    if not fleet:
        return None
    match rest:
        case ["devices", device, "status"] if device:
            return ParsedTopic(fleet, "status", device_id=device)
        case ["devices", device, "deploy"] if device:
            return ParsedTopic(fleet, "deploy_report", device_id=device)
        case ["models", "current"]:
            return ParsedTopic(fleet, "model_current")
        case ["rounds", number, "task"]:
            n = _int_level(number)
            return None if n is None else ParsedTopic(fleet, "task", round_number=n)
        case ["rounds", number, "result"]:
            n = _int_level(number)
            return None if n is None else ParsedTopic(fleet, "result", round_number=n)
        case ["rounds", number, "update", device] if device:
            n = _int_level(number)
            return (
                None
                if n is None
                else ParsedTopic(fleet, "update", device_id=device, round_number=n)
            )
    return None


# -- delivery: releases per target, artifact chunks, deploy reports --
#
# A release is retained on the topic of its target, so targets do not overwrite each other and a
# board that joins later still finds the release meant for it:
#
#     models/current                          the whole fleet
#     groups/{group}/models/current           one group
#     devices/{id}/models/current             one device (deploy --devices)
#     models/{version}/{file}/chunk/{i}       artifact chunks, retained, shared by every target
#     devices/{id}/deploy                     the board's report on the last release (retained)


def fleet_release(fleet: str) -> str:
    """Return the retained release topic for every board of a fleet."""
    return model_current(fleet)


def group_release(fleet: str, group: str) -> str:
    """Return the retained release topic for one group of a fleet."""
    return f"{fleet_root(fleet)}/groups/{check_name(group, 'group')}/models/current"


def device_release(fleet: str, device_id: str) -> str:
    """Return the retained release topic for one device."""
    return f"{fleet_root(fleet)}/devices/{check_name(device_id, 'device ID')}/models/current"


def release_topics_for(fleet: str, device_id: str, group: str | None) -> list[str]:
    """Return every release topic a board subscribes to (fleet, its group, itself)."""
    topics = [fleet_release(fleet), device_release(fleet, device_id)]
    if group:
        topics.append(group_release(fleet, group))
    return topics


def all_release_topics(fleet: str) -> list[str]:
    """Return filters matching every release topic of a fleet (to find chunks still in use)."""
    root = fleet_root(fleet)
    return [
        model_current(fleet),
        f"{root}/groups/+/models/current",
        f"{root}/devices/+/models/current",
    ]


def artifact_chunk(fleet: str, version: int, file: str, index: int) -> str:
    """Return the topic of chunk `index` of artifact `file` of bundle `version`."""
    name = check_name(file, "artifact file name")
    return f"{fleet_root(fleet)}/models/{int(version)}/{name}/chunk/{int(index)}"


def artifact_chunks(fleet: str, version: int, file: str) -> str:
    """Return the filter matching every chunk of one artifact."""
    name = check_name(file, "artifact file name")
    return f"{fleet_root(fleet)}/models/{int(version)}/{name}/chunk/+"


def deploy_report(fleet: str, device_id: str) -> str:
    """Return the topic a board reports its handling of a release on (retained)."""
    return f"{fleet_root(fleet)}/devices/{check_name(device_id, 'device ID')}/deploy"


def all_deploy_reports(fleet: str) -> str:
    """Return the filter matching every board's deploy report."""
    return f"{fleet_root(fleet)}/devices/+/deploy"


def parse_chunk(topic: str) -> tuple[int, str, int] | None:
    """Return (version, file, index) of an artifact chunk topic, or None for any other topic."""
    levels = topic.split("/")
    if len(levels) != 8 or levels[3] != "models" or levels[6] != "chunk":
        return None
    version, file, index = levels[4], levels[5], levels[7]
    if not (version.isdigit() and index.isdigit() and file):
        return None
    return int(version), file, int(index)
