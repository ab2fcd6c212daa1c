"""Delivery topics under `edgefl/v1/{fleet}/`: releases per target, artifact chunks, reports.

A release is retained on the topic of its target, so targets do not overwrite each other and a
board that joins later still finds the release meant for it:

    models/current                          the whole fleet
    groups/{group}/models/current           one group
    devices/{id}/models/current             one device (deploy --devices)
    models/{version}/{file}/chunk/{i}       artifact chunks, retained, shared by every target
    devices/{id}/deploy                     the board's report on the last release (retained)
"""

from __future__ import annotations

from edgefl.transport.topics import check_name, fleet_root, model_current


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


def device_of(topic: str) -> str | None:
    """Return the device ID of a `devices/{id}/...` topic, or None."""
    levels = topic.split("/")
    if len(levels) >= 5 and levels[3] == "devices":
        return levels[4]
    return None
