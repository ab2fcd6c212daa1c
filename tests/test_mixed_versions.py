"""Two versions on one broker: a newer peer's extra fields never break an older one (issue 9).

A fleet is upgraded one machine at a time, so for a while an aggregator talks to agents of the
next version and an agent to an aggregator of the next version. Both sides here are the real
ones over Mosquitto; the "newer" peer is raw MQTT that adds fields this edgefl does not know.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from bundles import digits_devices, make_test_bundle
from conftest import RunningBroker, wait_for
from safetensors.numpy import save as save_safetensors

from edgefl.core.codecs import encode_delta
from edgefl.core.settings import RoundPolicy, RoundSettings
from edgefl.head import head_digest
from edgefl.roles.agent import Agent, AgentConfig
from edgefl.roles.aggregator import Aggregator, AggregatorConfig
from edgefl.transport import topics
from edgefl.transport.client import Message, MqttClient
from edgefl.transport.messages import (
    META_KEY,
    DeviceStatus,
    UpdateHeader,
    decode_round_task,
    read_update_header,
)

# What a next version might add: fields at the top level, inside the settings, in a header.
EXTRA = {"battery": 0.61, "next_version_feature": {"nested": [1, 2, 3]}}


def _with_extra(message: dict[str, object]) -> str:
    return json.dumps({**message, **EXTRA})


def test_an_aggregator_accepts_a_newer_agents_status_and_update(
    mosquitto: RunningBroker, tmp_path: Path
) -> None:
    bundle = make_test_bundle(tmp_path / "bundle", feature_size=16)
    fleet = "newer-agent"
    client = MqttClient(mosquitto.url, "newer-agent")

    def on_task(message: Message) -> None:
        if not message.payload:
            return
        task, heads = decode_round_task(message.payload)
        delta = {k: np.full(v.shape, 0.01, np.float32) for k, v in heads["default"].items()}
        header = UpdateHeader(task.round, "pi-next", "default", 20, task.head_version,
                              run_id=task.run_id, head_digest=task.head_digest,
                              bundle_digest=task.bundle_digest)  # fmt: skip
        metadata = {META_KEY: _with_extra(asdict(header))}
        payload = encode_delta(delta, "float32", metadata=metadata)
        client.publish(topics.round_update(fleet, task.round, "pi-next"), payload)

    client.subscribe(topics.all_tasks(fleet), on_task)
    client.connect()
    status = DeviceStatus("pi-next", "online", samples=20, bundle_digest=bundle.digest)
    status_json = _with_extra(json.loads(status.encode()))
    client.publish(topics.device_status(fleet, "pi-next"), status_json.encode(), retain=True)
    try:
        policy = RoundPolicy(rounds=2, min_devices=1, deadline_s=20, settle_s=0.2)
        summary = Aggregator(AggregatorConfig(mosquitto.url, fleet, bundle.path, policy)).run()
    finally:
        client.publish(topics.device_status(fleet, "pi-next"), b"", retain=True).wait(5)
        client.close()
    assert [(r.status, r.selected, r.accepted) for r in summary.rounds] == [("closed", 1, 1)] * 2


def test_an_agent_answers_a_newer_aggregators_task(
    mosquitto: RunningBroker, tmp_path: Path
) -> None:
    bundle = make_test_bundle(tmp_path / "bundle", feature_size=16)
    fleet = "newer-aggregator"
    (data, *_), _ = digits_devices(2)
    agent = Agent(AgentConfig(mosquitto.url, fleet, "pi-old", bundle_dir=bundle.path), data)
    updates: list[bytes] = []
    observer = MqttClient(mosquitto.url, "observer")
    observer.subscribe(topics.all_updates(fleet), lambda m: updates.append(m.payload))
    observer.connect()
    agent.start()
    heads = {"default": bundle.head_weights()}
    settings = RoundSettings().to_wire()
    settings["train"] = {**settings["train"], "momentum_next_version": 0.9}
    task = {
        "round": 1, "selected": ["pi-old"], "tasks": ["default"], "head_version": 0,
        "model_version": bundle.manifest.version, "deadline_s": 30.0, "config": settings,
        "run_id": "run-next", "head_digest": head_digest(heads),
        "bundle_digest": bundle.digest, "schema_version": 2,
    }  # fmt: skip
    arrays = {
        f"default/{k}": np.ascontiguousarray(v, np.float32) for k, v in heads["default"].items()
    }
    payload = save_safetensors(arrays, metadata={META_KEY: _with_extra(task)})
    publisher = MqttClient(mosquitto.url, "newer-aggregator")
    publisher.connect()
    try:
        publisher.publish(topics.round_task(fleet, 1), payload, qos=1).wait(5)
        assert wait_for(lambda: bool(updates))
    finally:
        publisher.close()
        agent.stop()
        observer.close()
    header = read_update_header(updates[0])
    assert (header.status, header.run_id, header.samples) == ("ok", "run-next", len(data))
