"""The topic scheme and the pure MQTT filter matcher."""

from __future__ import annotations

import pytest

from edgefl.transport import topics


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/b/c", "a/b/c", True),
        ("a/b/c", "a/b/d", False),
        ("a/b/c", "a/b", False),
        ("a/b", "a/b/c", False),
        ("a/+/c", "a/x/c", True),
        ("a/+/c", "a/x/y/c", False),
        ("a/+", "a/", True),  # an empty level is a level
        ("+/+", "a/b", True),
        ("+", "a/b", False),
        ("a/#", "a", True),  # '#' includes the parent level
        ("a/#", "a/b/c/d", True),
        ("a/#", "b/c", False),
        ("#", "a/b/c", True),
        ("#", "$SYS/broker/load", False),  # wildcards never match $-topics at the first level
        ("+/broker", "$SYS/broker", False),
        ("$SYS/#", "$SYS/broker", True),
        ("a/#/c", "a/b/c", False),  # '#' must be last
        ("edgefl/v1/lab/rounds/+/update/+", "edgefl/v1/lab/rounds/3/update/pi-01", True),
        ("edgefl/v1/lab/rounds/+/update/+", "edgefl/v1/lab/rounds/3/update/pi-01/x", False),
        ("edgefl/v1/lab/devices/+/status", "edgefl/v1/other/devices/pi/status", False),
    ],
)
def test_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topics.matches(topic_filter, topic) is expected


def test_builders_follow_the_versioned_scheme() -> None:
    assert topics.device_status("lab", "pi-01") == "edgefl/v1/lab/devices/pi-01/status"
    assert topics.model_current("lab") == "edgefl/v1/lab/models/current"
    assert topics.round_task("lab", 2) == "edgefl/v1/lab/rounds/2/task"
    assert topics.round_update("lab", 2, "pi-01") == "edgefl/v1/lab/rounds/2/update/pi-01"
    assert topics.round_result("lab", 2) == "edgefl/v1/lab/rounds/2/result"
    assert topics.matches(topics.all_updates("lab"), topics.round_update("lab", 9, "x"))
    assert topics.matches(topics.all_statuses("lab"), topics.device_status("lab", "x"))
    assert topics.matches(topics.all_tasks("lab"), topics.round_task("lab", 1))


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "a#", "x" * 129])
def test_names_that_would_break_topics_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="must be 1-128 characters"):
        topics.device_status("lab", bad)


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("edgefl/v1/lab/devices/pi/status", topics.ParsedTopic("lab", "status", device_id="pi")),
        ("edgefl/v1/lab/models/current", topics.ParsedTopic("lab", "model_current")),
        ("edgefl/v1/lab/models/4/backbone.onnx/chunk/12", None),  # edgefl.delivery.topics
        ("edgefl/v1/lab/rounds/5/task", topics.ParsedTopic("lab", "task", round_number=5)),
        ("edgefl/v1/lab/rounds/5/result", topics.ParsedTopic("lab", "result", round_number=5)),
        (
            "edgefl/v1/lab/rounds/5/update/pi",
            topics.ParsedTopic("lab", "update", device_id="pi", round_number=5),
        ),
        ("edgefl/v1/lab/rounds/x/update/pi", None),
        ("edgefl/v1/lab/rounds/-1/task", None),
        ("edgefl/v2/lab/rounds/1/task", None),
        ("edgefl/v1/lab/rounds/1/update/", None),
        ("other/v1/lab/rounds/1/task", None),
    ],
)
def test_parse(topic: str, expected: topics.ParsedTopic | None) -> None:
    assert topics.parse(topic) == expected
