"""Topic tries for an in-process broker: who subscribed to what, and which messages are retained.

A broker with 10,000 sessions cannot match every publish against every filter (each agent holds
a few). Filters live in a trie keyed by topic level, with `+` and `#` as ordinary children, so a
publish walks only the branches its levels name. Retained messages live in a second trie keyed
by topic level, so a new subscription walks only the branches its filter names. Both follow MQTT
3.1.1 section 4.7 as `edgefl.transport.topics.matches` does: `#` also matches the parent level,
and a filter starting with a wildcard does not match a topic starting with `$`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

Value = TypeVar("Value")
Key = TypeVar("Key")

SHARE_PREFIX = "$share/"


def split_shared(topic_filter: str) -> tuple[str | None, str]:
    """Return (group, filter) of `$share/GROUP/filter`, or (None, filter) for a plain filter.

    Raises:
        ValueError: a `$share/` filter without a group or without a filter after it.
    """
    if not topic_filter.startswith(SHARE_PREFIX):
        return None, topic_filter
    group, _, rest = topic_filter[len(SHARE_PREFIX) :].partition("/")
    if not group or not rest or "+" in group or "#" in group:
        raise ValueError(f"shared subscription {topic_filter!r} must be $share/GROUP/FILTER")
    return group, rest


class _FilterNode(Generic[Key]):
    __slots__ = ("children", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _FilterNode[Key]] = {}
        self.subscribers: dict[Key, int] = {}  # subscriber -> QoS


class SubscriptionTree(Generic[Key]):
    """Filters by topic level; `match(topic)` returns every subscriber whose filter matches."""

    def __init__(self) -> None:
        """Start empty."""
        self._root: _FilterNode[Key] = _FilterNode()

    def add(self, topic_filter: str, subscriber: Key, qos: int) -> None:
        """Subscribe `subscriber` to `topic_filter` (again: the new QoS replaces the old)."""
        node = self._root
        for level in topic_filter.split("/"):
            node = node.children.setdefault(level, _FilterNode())
        node.subscribers[subscriber] = qos

    def remove(self, topic_filter: str, subscriber: Key) -> None:
        """Drop one subscription; empty branches are pruned so the tree does not grow forever."""
        path = [self._root]
        levels = topic_filter.split("/")
        for level in levels:
            child = path[-1].children.get(level)
            if child is None:
                return
            path.append(child)
        path[-1].subscribers.pop(subscriber, None)
        for depth in range(len(levels), 0, -1):
            node = path[depth]
            if node.subscribers or node.children:
                break
            del path[depth - 1].children[levels[depth - 1]]

    def match(self, topic: str) -> dict[Key, int]:
        """Return {subscriber: highest QoS among its matching filters} for a published topic."""
        found: dict[Key, int] = {}
        levels = topic.split("/")
        dollar = topic.startswith("$")

        def take(node: _FilterNode[Key]) -> None:
            for subscriber, qos in node.subscribers.items():
                if found.get(subscriber, -1) < qos:
                    found[subscriber] = qos

        def walk(node: _FilterNode[Key], depth: int) -> None:
            wildcards = not (dollar and depth == 0)
            if wildcards and "#" in node.children:
                take(node.children["#"])  # matches this level and everything below
            if depth == len(levels):
                take(node)
                return
            exact = node.children.get(levels[depth])
            if exact is not None:
                walk(exact, depth + 1)
            if wildcards and "+" in node.children:
                walk(node.children["+"], depth + 1)

        walk(self._root, 0)
        return found


class _TopicNode(Generic[Value]):
    __slots__ = ("children", "value")

    def __init__(self) -> None:
        self.children: dict[str, _TopicNode[Value]] = {}
        self.value: Value | None = None


class RetainedTree(Generic[Value]):
    """Retained messages by topic level; `matching(filter)` yields those a subscription gets."""

    def __init__(self) -> None:
        """Start empty."""
        self._root: _TopicNode[Value] = _TopicNode()
        self._count = 0

    def __len__(self) -> int:
        """How many topics hold a retained message."""
        return self._count

    def set(self, topic: str, value: Value | None) -> None:
        """Retain `value` on `topic`; None clears it (an empty retained payload does that)."""
        levels = topic.split("/")
        if value is None:
            path = [self._root]
            for level in levels:
                child = path[-1].children.get(level)
                if child is None:
                    return
                path.append(child)
            if path[-1].value is not None:
                self._count -= 1
            path[-1].value = None
            for depth in range(len(levels), 0, -1):
                node = path[depth]
                if node.value is not None or node.children:
                    break
                del path[depth - 1].children[levels[depth - 1]]
            return
        node = self._root
        for level in levels:
            node = node.children.setdefault(level, _TopicNode())
        if node.value is None:
            self._count += 1
        node.value = value

    def matching(self, topic_filter: str) -> Iterator[Value]:
        """Yield the retained values on every topic `topic_filter` matches."""
        levels = topic_filter.split("/")

        def everything(node: _TopicNode[Value]) -> Iterator[Value]:
            if node.value is not None:
                yield node.value
            for child in node.children.values():
                yield from everything(child)

        def walk(node: _TopicNode[Value], depth: int) -> Iterator[Value]:
            if depth == len(levels):
                if node.value is not None:
                    yield node.value
                return
            level = levels[depth]
            if level == "#":
                # `a/#` matches `a` too; at the first level it matches no `$` topic.
                if depth > 0 and node.value is not None:
                    yield node.value
                for name, child in node.children.items():
                    if not (depth == 0 and name.startswith("$")):
                        yield from everything(child)
            elif level == "+":
                for name, child in node.children.items():
                    if not (depth == 0 and name.startswith("$")):
                        yield from walk(child, depth + 1)
            else:
                exact = node.children.get(level)
                if exact is not None:
                    yield from walk(exact, depth + 1)

        yield from walk(self._root, 0)
