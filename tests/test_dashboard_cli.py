"""`edgefl dashboard`, `simulate --dashboard --metrics-port`: the commands a user types."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from bundles import digits_devices, make_test_bundle
from click.testing import CliRunner
from conftest import RunningBroker, free_port, wait_for
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefl.cli import main
from edgefl.delivery.release import DeployReport
from edgefl.roles.agent import Agent, AgentConfig
from edgefl.roles.record import AggregatorRecord
from edgefl.security.device_registry import DeviceRegistry
from edgefl.transport import topics
from edgefl.transport.client import MqttClient
from edgefl.transport.messages import DeviceStatus
from edgefl.transport.sealed import raw_public_key, seal

EDGEFL = str(Path(sys.executable).parent / "edgefl")


def test_binding_beyond_loopback_without_a_token_is_refused() -> None:
    result = CliRunner().invoke(
        main, ["dashboard", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--host", "0.0.0.0"]
    )
    assert result.exit_code == 2
    assert "binding 0.0.0.0 (not loopback) needs --token" in result.output


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def _start_dashboard(url: str, fleet: str, port: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [EDGEFL, "dashboard", "--broker", url, "--fleet", fleet, "--port", str(port), *extra],
        env={"EDGEFL_DASHBOARD_TOKEN": "tok", "PATH": "/usr/bin:/bin"},
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _stop(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGINT)
    _out, err = process.communicate(timeout=15)
    assert "Traceback" not in err
    assert process.returncode == 0 and err.rstrip().endswith("stopped")  # Ctrl-C ends it cleanly
    return err


def test_edgefl_dashboard_serves_the_fleet_and_its_record_behind_the_token(
    mosquitto: RunningBroker, tmp_path: Path
) -> None:
    fleet = "cli-dash"
    state = tmp_path / "state.sqlite"
    record = AggregatorRecord(state)
    record.open_round(1, {"pi-1": "default"}, 0.0, 0, {})
    record.close_round(1, "closed", {"round": 1, "selected": 1, "accepted": 1, "seconds": 1.5},
                       {"accuracy": 0.9})  # fmt: skip
    record.close()
    board, rogue = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    registry = DeviceRegistry(state)
    registry.enroll("pi-1", raw_public_key(board))
    registry.enroll("pi-2", raw_public_key(Ed25519PrivateKey.generate()))
    registry.close()
    before = hashlib.sha256(state.read_bytes()).hexdigest()
    publisher = MqttClient(mosquitto.url, "cli-dash-publisher")
    publisher.connect()
    status_topic = topics.device_status(fleet, "pi-1")
    status = DeviceStatus("pi-1", "online", profile="jetson").encode()
    publisher.publish(status_topic, seal(board, status_topic, status), retain=True).wait()
    # In pi-2's name, sealed by a stranger: a deploy report the page must not show.
    report_topic = topics.deploy_report(fleet, "pi-2")
    forged = DeployReport("pi-2", 9, "installed").to_bytes()
    publisher.publish(report_topic, seal(rogue, report_topic, forged), retain=True).wait()
    port = free_port()
    process = _start_dashboard(mosquitto.url, fleet, port, "--state", str(state))
    base = f"http://127.0.0.1:{port}/"
    try:
        assert wait_for(lambda: _get(base)[0] == 401 or process.poll() is not None, 30.0)
        assert process.poll() is None, process.communicate()[1]
        assert "needs its token" in _get(base + "api/view")[1]
        assert wait_for(lambda: '"id":"pi-1"' in _get(base + "api/view?token=tok")[1], 10.0)
        # A forged status in pi-1's name, live: pi-1 stays online on the jetson profile.
        offline = DeviceStatus("pi-1", "offline", profile="evil").encode()
        publisher.publish(status_topic, seal(rogue, status_topic, offline)).wait()
        assert wait_for(lambda: '"refused":2' in _get(base + "api/view?token=tok")[1], 10.0)
        view = json.loads(_get(base + "api/view?token=tok")[1])
        assert [(d["id"], d["state"], d["profile"], d["refused"]) for d in view["devices"]] == [
            ("pi-1", "online", "jetson", 1)
        ]
        assert view["deploys"] == []
        assert [r["line"].split(":")[0] for r in view["refused"]] == [
            "1 forged message refused in pi-1's name", "1 forged message refused in pi-2's name",
        ]  # fmt: skip
        assert view["seals"]["checked"] and view["seals"]["refused"] == 2
        assert [(r["round"], r["accuracy"], r["seconds"]) for r in view["rounds"]] == [
            (1, 0.9, 1.5)
        ]
        status_code, page = _get(base + "?token=tok")
        assert status_code == 200 and "edgefl · cli-dash" in page
    finally:
        err = _stop(process)
        for topic in (status_topic, report_topic):
            publisher.publish(topic, b"", retain=True).wait()
        publisher.close()
    assert f"dashboard of fleet {fleet} at http://127.0.0.1:{port}/?token=tok" in err
    assert "WARNING" not in err
    # Read-only: the aggregator's state is byte for byte as it was.
    assert hashlib.sha256(state.read_bytes()).hexdigest() == before


def test_edgefl_dashboard_says_when_it_checks_no_seal(
    mosquitto: RunningBroker, tmp_path: Path
) -> None:
    fleet = "cli-dash-open"
    publisher = MqttClient(mosquitto.url, "cli-dash-open-publisher")
    publisher.connect()
    topic = topics.device_status(fleet, "pi-1")
    publisher.publish(topic, DeviceStatus("pi-1", "online").encode(), retain=True).wait()
    state = tmp_path / "state.sqlite"
    AggregatorRecord(state).close()  # an --insecure aggregator's state: no device keys
    try:
        for extra, warning in [
            ((), "WARNING: no --state: the dashboard checks no seal"),
            (("--state", str(state), "--insecure"), "WARNING: the dashboard runs --insecure"),
        ]:
            port = free_port()
            process = _start_dashboard(mosquitto.url, fleet, port, *extra)
            api = f"http://127.0.0.1:{port}/api/view?token=tok"
            try:
                # The unsigned status is shown, and the page says plainly nothing is checked.
                assert wait_for(lambda: '"id":"pi-1"' in _get(api)[1], 30.0)  # noqa: B023
                seals = json.loads(_get(api)[1])["seals"]
                assert not seals["checked"] and "seals NOT checked" in seals["line"]
            finally:
                err = _stop(process)
            assert warning in err and "anyone on the broker can forge" in err
        # --state alone on that fleet: refused, and the reason says the way out.
        port = free_port()
        process = _start_dashboard(mosquitto.url, fleet, port, "--state", str(state))
        api = f"http://127.0.0.1:{port}/api/view?token=tok"
        try:
            assert wait_for(lambda: '"refused":1' in _get(api)[1], 30.0)
            view = json.loads(_get(api)[1])
            assert view["devices"] == []
            assert "watch it with `edgefl dashboard --insecure`" in view["refused"][0]["line"]
        finally:
            _stop(process)
    finally:
        publisher.publish(topic, b"", retain=True).wait()
        publisher.close()


@pytest.mark.slow
def test_simulate_offers_the_dashboard_and_metrics(
    mosquitto: RunningBroker, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        main,
        ["simulate", "--devices", "3", "--rounds", "2", "--broker", mosquitto.url,
         "--dashboard", "--dashboard-port", "0", "--metrics-port", "0", "--out",
         str(tmp_path / "out")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "dashboard: http://127.0.0.1:" in result.output
    assert "metrics: http://127.0.0.1:" in result.output


def test_edgefl_aggregate_serves_metrics_while_it_runs(
    mosquitto: RunningBroker, tmp_path: Path
) -> None:
    fleet, port = "cli-metrics", free_port()
    bundle = make_test_bundle(tmp_path / "bundle")
    datasets, _test = digits_devices(2)
    agents = [
        Agent(AgentConfig(mosquitto.url, fleet, f"pi-{i}", bundle_dir=bundle.path), data)
        for i, data in enumerate(datasets)
    ]
    for agent in agents:
        agent.start()
    scraped: list[str] = []

    def scrape() -> None:
        # Once a round is counted, keep the page as the run left it. Rounds of two boards can
        # follow each other faster than this polls, so any count from 1 on will do.
        while wait_for(lambda: _get(f"http://127.0.0.1:{port}/metrics")[0] == 200, 30.0):
            text = _get(f"http://127.0.0.1:{port}/metrics")[1]
            if re.search(r'edgefl_rounds_total\{status="closed"\} [1-9]', text):
                scraped.append(text)
                return

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    try:
        result = CliRunner().invoke(
            main,
            ["aggregate", "--broker", mosquitto.url, "--fleet", fleet, "--bundle",
             str(bundle.path), "--rounds", "5", "--min-devices", "2", "--settle", "0.2",
             "--deadline", "30", "--insecure", "--metrics-port", str(port),
             "--state", str(tmp_path / "state.sqlite")],
        )  # fmt: skip
    finally:
        for agent in agents:
            agent.stop()
    scraper.join(5.0)
    assert result.exit_code == 0, result.output
    assert f"metrics: http://127.0.0.1:{port}/metrics" in result.output
    assert scraped, "no scrape saw a round counted"
    assert 'edgefl_updates_total{outcome="accepted"}' in scraped[0]
    assert 'edgefl_devices{state="online"} 2.0' in scraped[0]
    assert 'edgefl_aggregator_info{fleet="cli-metrics"} 1.0' in scraped[0]
