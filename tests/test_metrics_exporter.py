"""The aggregator's Prometheus metrics: counters from literal verdicts and summaries, and a
scrape of /metrics during a real run over Mosquitto checked against the SQLite record."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from bundles import digits_devices, make_test_bundle
from conftest import RunningBroker
from prometheus_client.parser import text_string_to_metric_families

from edgefl.core.round_state import ACCEPTED, LATE, REJECTED, REPEATED, Verdict
from edgefl.core.settings import AcceptancePolicy, RoundPolicy
from edgefl.roles.agent import Agent, AgentConfig
from edgefl.roles.aggregator import Aggregator, AggregatorConfig, RoundSummary
from edgefl.roles.metrics_exporter import AggregatorMetrics, chain_rounds, parse_listen
from edgefl.transport import topics
from edgefl.transport.client import Message, MqttClient
from edgefl.transport.messages import DeviceStatus


def test_verdicts_and_rounds_become_counters_and_gauges() -> None:
    metrics = AggregatorMetrics("lab")
    for verdict in [
        Verdict(ACCEPTED, 1, "a", size=100),
        Verdict(ACCEPTED, 1, "b", size=120),
        Verdict(REJECTED, 1, "c", code="shape", size=50),
        Verdict(REJECTED, 1, "d", code="shape", size=50),
        Verdict(REJECTED, 1, "e", code="oversized", size=9000),
        Verdict(LATE, 1, "f", code="round-closed", size=100),
        Verdict(REPEATED, 1, "a", size=100),
    ]:
        metrics.on_verdict(verdict)
    metrics.on_round(
        RoundSummary(1, "closed", 1, 5, 2, {"shape": 2, "oversized": 1}, 1, 2.0,
                     {"accuracy": 0.8, "epsilon": 2.5, "delta": 1e-5}, online=6),
        task_bytes=1000,
    )  # fmt: skip
    metrics.watch_presence(lambda: {"a": "online", "b": "online", "c": "stale", "d": "offline"})
    value = metrics.registry.get_sample_value
    assert value("edgefl_updates_total", {"outcome": "accepted"}) == 2
    assert value("edgefl_updates_total", {"outcome": "rejected"}) == 3
    assert value("edgefl_updates_total", {"outcome": "late"}) == 1
    assert value("edgefl_updates_total", {"outcome": "repeated"}) == 1
    assert value("edgefl_updates_rejected_total", {"code": "shape"}) == 2
    assert value("edgefl_updates_rejected_total", {"code": "oversized"}) == 1
    assert value("edgefl_update_bytes_total", {"outcome": "accepted"}) == 220
    assert value("edgefl_update_bytes_total", {"outcome": "rejected"}) == 9100
    assert value("edgefl_rounds_total", {"status": "closed"}) == 1
    assert value("edgefl_rounds_total", {"status": "failed"}) == 0
    assert value("edgefl_round_duration_seconds_sum") == 2.0
    assert value("edgefl_round_duration_seconds_count") == 1
    assert value("edgefl_round_ingest_updates_per_second") == 2.5  # 5 answers in 2 s
    assert value("edgefl_task_bytes_total") == 5000
    assert value("edgefl_round_participants", {"kind": "online"}) == 6
    assert (value("edgefl_accuracy"), value("edgefl_privacy_epsilon")) == (0.8, 2.5)
    assert value("edgefl_devices", {"state": "online"}) == 2
    assert value("edgefl_devices", {"state": "stale"}) == 1
    assert value("edgefl_devices", {"state": "offline"}) == 1
    assert value("edgefl_aggregator_info", {"fleet": "lab"}) == 1


def test_metrics_port_values() -> None:
    assert parse_listen("9464") == ("127.0.0.1", 9464)
    assert parse_listen("0.0.0.0:9464") == ("0.0.0.0", 9464)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("abc", "1:70000", ""):
        with pytest.raises(ValueError, match="PORT or HOST:PORT"):
            parse_listen(bad)


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_scrape_during_a_run_matches_the_sqlite_record(
    mosquitto: RunningBroker, tmp_path: Path
) -> None:
    fleet, rounds = "metrics", 3
    bundle = make_test_bundle(tmp_path / "bundle")
    datasets, _test = digits_devices(3)
    ids = [f"pi-{i}" for i in range(3)]
    state_path = tmp_path / "state.sqlite"
    # pi-silent is online and selected but never answers: every round runs to its deadline, so
    # the intruder's junk lands in its round however loaded the machine (not after its close).
    config = AggregatorConfig(
        mosquitto.url, fleet, bundle.path,
        RoundPolicy(rounds=rounds, min_devices=4, deadline_s=3.0, settle_s=0.2),
        acceptance=AcceptancePolicy(allow=(*ids, "pi-silent")), state_path=state_path,
    )  # fmt: skip
    metrics = AggregatorMetrics(fleet)
    port = metrics.serve(0)
    scrapes: list[tuple[int, dict, list[tuple[str, str, int, int]]]] = []
    aggregator: list[Aggregator] = []

    def scrape_and_read_record(summary: RoundSummary) -> None:
        # After a round is stored: the record's committed rows against what /metrics says.
        aggregator[0].state.flush()
        with sqlite3.connect(f"{state_path.as_uri()}?mode=ro", uri=True) as db:
            rows = db.execute(
                "SELECT outcome, code, COUNT(*), SUM(size) FROM updates GROUP BY 1, 2"
            ).fetchall()
        scrapes.append((summary.round, _scrape(port), rows))

    server = Aggregator(
        config, on_verdict=metrics.on_verdict,
        on_round=chain_rounds(metrics.on_round, scrape_and_read_record),
    )  # fmt: skip
    aggregator.append(server)
    metrics.watch_presence(server.device_presence)
    # A stranger answers every task with garbage: rejections by code show up in both places.
    intruder = MqttClient(mosquitto.url, "intruder")

    def on_task(message: Message) -> None:
        parsed = topics.parse(message.topic)
        if message.payload and parsed is not None and parsed.round_number is not None:
            intruder.publish(topics.round_update(fleet, parsed.round_number, "pi-0"), b"junk")

    intruder.subscribe(topics.all_tasks(fleet), on_task)
    intruder.connect()
    silent = DeviceStatus(
        "pi-silent", "online", samples=10, time=time.time(),
        model_version=bundle.manifest.version, bundle_digest=bundle.digest,
    )  # fmt: skip
    silent_topic = topics.device_status(fleet, "pi-silent")
    intruder.publish(silent_topic, silent.encode(), qos=1, retain=True).wait(5)
    agents = [
        Agent(AgentConfig(mosquitto.url, fleet, device, bundle_dir=bundle.path), data)
        for device, data in zip(ids, datasets, strict=True)
    ]
    for agent in agents:
        agent.start()
    try:
        result: list[object] = []
        runner = threading.Thread(target=lambda: result.append(server.run()))
        runner.start()
        runner.join(120.0)
        assert result, "the run did not finish"
    finally:
        intruder.publish(silent_topic, b"", qos=1, retain=True).wait(5)
        intruder.close()
        for agent in agents:
            agent.stop()
        metrics.close()
    assert [number for number, _, _ in scrapes] == list(range(1, rounds + 1))
    for _number, scraped, rows in scrapes:
        by_outcome: dict[str, int] = {}
        bytes_by_outcome: dict[str, int] = {}
        rejected: dict[str, int] = {}
        for outcome, code, count, size in rows:
            by_outcome[outcome] = by_outcome.get(outcome, 0) + count
            bytes_by_outcome[outcome] = bytes_by_outcome.get(outcome, 0) + size
            if outcome == "rejected":
                rejected[code] = count
        for outcome, count in by_outcome.items():
            assert scraped[("edgefl_updates_total", (("outcome", outcome),))] == count
            assert (
                scraped[("edgefl_update_bytes_total", (("outcome", outcome),))]
                == (bytes_by_outcome[outcome])
            )
        for code, count in rejected.items():
            assert scraped[("edgefl_updates_rejected_total", (("code", code),))] == count
        assert rejected, "the intruder's junk was not rejected"
    last_round, scraped, rows = scrapes[-1]
    record = aggregator[0].state
    closed = sum(1 for r in record.rounds() if r.status == "closed")
    assert scraped[("edgefl_rounds_total", (("status", "closed"),))] == closed == rounds
    assert scraped[("edgefl_round", ())] == last_round
    assert scraped[("edgefl_round_duration_seconds_count", ())] == rounds
    assert scraped[("edgefl_devices", (("state", "online"),))] == len(agents) + 1  # pi-silent
    # The junk came first on pi-0's topic, so it is pi-0's answer: 2 of 3 accepted per round.
    result = record.rounds()[-1].result
    assert result is not None
    assert scraped[("edgefl_round_participants", (("kind", "accepted"),))] == result["accepted"]
    assert scraped[("edgefl_round_participants", (("kind", "selected"),))] == result["selected"]


def test_the_grafana_dashboard_queries_only_metrics_the_exporter_serves() -> None:
    dashboard = json.loads(
        (Path(__file__).parents[1] / "grafana" / "edgefl-fleet.json").read_text()
    )
    metrics = AggregatorMetrics("lab")
    metrics.on_verdict(Verdict(REJECTED, 1, "a", code="shape"))
    metrics.on_round(RoundSummary(1, "closed", 1, 1, 1, {}, 0, 1.0, {"accuracy": 0.5}))
    served = {sample.name for family in metrics.registry.collect() for sample in family.samples}
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b((?:edgefl|process)_[a-z_]+)\b", target["expr"])
    }
    assert queried and queried <= served, queried - served
    assert {
        "edgefl_devices",
        "edgefl_updates_total",
        "edgefl_updates_rejected_total",
        "edgefl_round_duration_seconds_bucket",
        "edgefl_update_bytes_total",
    } <= queried
