"""The dashboard in a real browser: headless Chromium (Selenium) watches a simulated federation
over a real Mosquitto; devices and rounds appear and update without a reload."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bundles import make_test_bundle
from conftest import RunningBroker, wait_for
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefl.core.settings import PrivacySettings, RoundPolicy, RoundSettings
from edgefl.dashboard.service import Dashboard, DashboardSettings
from edgefl.delivery.release import DeployReport
from edgefl.security.device_registry import DeviceRegistry
from edgefl.simulation.runner import Simulation, SimulationConfig
from edgefl.simulation.workload import load_federated_data
from edgefl.transport import topics
from edgefl.transport.client import MqttClient
from edgefl.transport.messages import DeviceStatus
from edgefl.transport.sealed import raw_public_key, seal

ARTIFACTS = Path(__file__).resolve().parents[1] / "build" / "test-artifacts"
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's headless Chromium driven by its chromedriver (no download, no network)."""
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.fail("chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1400,1400"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    yield driver
    driver.quit()


def _rows(browser: Any, table: str) -> list[str]:
    # Read in one script: the page re-renders tables on every event, so elements found one call
    # earlier may already be replaced. Device rows carry data-device (the rest pad the scroll).
    script = "return Array.from(document.querySelectorAll(arguments[0])).map(r => r.innerText);"
    rows = f"#{table} tbody tr" + ("[data-device]" if table == "devices" else "")
    return [" ".join(t.split()) for t in browser.execute_script(script, rows)]


def _text(browser: Any, element_id: str) -> str:
    return str(browser.execute_script("return document.getElementById(arguments[0]).innerText;",
                                      element_id))  # fmt: skip


def test_the_page_shows_a_federation_learn_live_and_needs_its_token(
    mosquitto: RunningBroker, browser: Any, tmp_path: Path
) -> None:
    devices, rounds = 8, 4
    bundle = make_test_bundle(tmp_path / "bundle")
    config = SimulationConfig(
        devices=devices, broker_url=mosquitto.url, fleet="browser", partition="iid",
        policy=RoundPolicy(rounds=rounds, deadline_s=10.0),
        # DP-FedAvg: every round is noised, so the page shows the privacy spent.
        settings=RoundSettings(privacy=PrivacySettings(clip_norm=1.0, noise_multiplier=1.0)),
        # The slowest device answers 0.5 s late: each round is open long enough to be seen.
        speed_spread=2.0, speed_unit_s=0.5,
    )  # fmt: skip
    page: list[Dashboard] = []
    published: list[str] = []
    page_open, seen_all = threading.Event(), threading.Event()

    def serve_and_wait(url: str) -> None:
        dashboard = Dashboard(DashboardSettings(url, "browser", port=0, token=TOKEN))
        # Read-only: anything it would publish is recorded here instead of sent.
        dashboard.watcher.client.publish = lambda topic, *_a, **_k: published.append(topic)
        dashboard.start()
        page.append(dashboard)
        # Rounds start only once the browser shows the fleet: what follows must arrive live.
        assert page_open.wait(30.0)

    def hold_after_last_round(record: Any) -> None:
        # The devices leave (and their retained statuses are cleared) once the run ends.
        if record.round == rounds:
            seen_all.wait(30.0)

    simulation = Simulation(config, bundle, load_federated_data("digits"),
                            on_round=hold_after_last_round,
                            before_rounds=serve_and_wait)  # fmt: skip
    outcome: list[Any] = []
    runner = threading.Thread(target=lambda: outcome.append(simulation.run()), daemon=True)
    runner.start()
    try:
        assert wait_for(lambda: bool(page), 30.0), "the simulation never reached its rounds"
        dashboard = page[0]
        base = dashboard.server.url()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + "events", timeout=5)
        assert refused.value.code == 401

        browser.get(base)
        assert "needs its token" in browser.find_element("tag name", "body").text
        browser.get(dashboard.url)  # ?token=...: the page passes it on to its event stream
        browser.execute_script("window.loadedOnce = true;")
        assert wait_for(lambda: len(_rows(browser, "devices")) == devices, 15.0), _rows(
            browser, "devices"
        )
        assert _text(browser, "count-online") == str(devices)
        first = _rows(browser, "devices")[0]
        assert "online" in first and "v1" in first and "backbone-fp32.onnx onnxruntime" in first
        page_open.set()

        # Rounds arrive over the event stream: running first, then closed with their accuracy.
        assert wait_for(lambda: any("running" in r for r in _rows(browser, "rounds")), 20.0)
        assert wait_for(lambda: len(_rows(browser, "rounds")) == rounds
                        and all("closed" in r for r in _rows(browser, "rounds")), 60.0), _rows(
            browser, "rounds"
        )  # fmt: skip
        newest = _rows(browser, "rounds")[0]
        assert newest.startswith(f"{rounds} closed {devices} / {devices}"), newest
        assert _text(browser, "count-rounds") == str(rounds)
        accuracy = float(_text(browser, "last-accuracy"))
        assert 0.0 <= accuracy <= 1.0
        epsilon = json.loads(urllib.request.urlopen(dashboard.url.replace("/?", "/api/view?"))
                             .read())["privacy"]["epsilon"]  # fmt: skip
        assert epsilon > 0 and _text(browser, "epsilon") == f"ε = {epsilon:.3g} at δ = 1e-5"
        assert f"ε={epsilon:.3g} spent at δ=1e-05 after round {rounds}" in _text(
            browser, "privacy-line"
        )
        curve = browser.find_elements("css selector", "#chart-accuracy circle")
        assert len(curve) == rounds
        assert browser.execute_script("return window.loadedOnce === true;"), "the page reloaded"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
        rows = _rows(browser, "devices")
        assert len(rows) == devices and all("online" in r for r in rows), rows
        # Each device's last round comes from the round results, before its next heartbeat.
        last_rounds = browser.execute_script(
            "return Array.from(document.querySelectorAll('#devices tr[data-device]'))"
            ".map(r => r.cells[6].innerText);"
        )
        assert last_rounds == [str(rounds)] * devices
        seen_all.set()
        runner.join(60.0)
        assert outcome and len(outcome[0].rounds) == rounds
        assert published == []
    finally:
        page_open.set()
        seen_all.set()
        runner.join(60.0)
        for dashboard in page:
            dashboard.stop()


def test_a_thousand_devices_scroll_and_filter(
    mosquitto: RunningBroker, browser: Any, tmp_path: Path
) -> None:
    fleet, devices = "browser-1000", 1000
    publisher = MqttClient(mosquitto.url, "browser-1000-publisher")
    publisher.connect()
    ids = [f"dev-{i:04d}" for i in range(devices)]
    handles = [
        publisher.publish(topics.device_status(fleet, device),
                          DeviceStatus(device, "online", profile="raspberry-pi").encode(),
                          retain=True)
        for device in ids
    ]  # fmt: skip
    assert handles[-1].wait(10.0)
    reports = [
        DeployReport("dev-0002", 4, "installed"),
        DeployReport("dev-0001", 4, "downloading", received_bytes=512, total_bytes=2048),
    ]
    for report in reports:
        topic = topics.deploy_report(fleet, report.device_id)
        assert publisher.publish(topic, report.to_bytes(), retain=True).wait(10.0)
    dashboard = Dashboard(DashboardSettings(mosquitto.url, fleet, port=0))
    dashboard.start()
    try:
        assert wait_for(lambda: dashboard.source.view()["counts"]["online"] == devices, 20.0)
        browser.get(dashboard.url)
        assert _text(browser, "footer").startswith(f"{devices} of {devices} devices shown")
        assert _text(browser, "count-online") == str(devices)
        # No state file: the page says plainly that what it shows could be forged.
        assert _text(browser, "seals").startswith("seals NOT checked: anyone on the broker")
        assert not browser.find_element("id", "refused-section").is_displayed()
        # Deploys in progress first, with their progress; then the boards that are done.
        assert _rows(browser, "deploys") == [
            "dev-0001 v4 downloading 512 B / 2.0 kB", "dev-0002 v4 installed",
        ]  # fmt: skip
        assert _text(browser, "deploy-summary") == "downloading 1, installed 1"
        shown = _rows(browser, "devices")
        # Only the rows in view are drawn; scrolling draws the others.
        assert shown[0].startswith("dev-0000") and len(shown) < 100
        browser.execute_script("const b = document.getElementById('devices').parentNode;"
                               "b.scrollTop = b.scrollHeight;")  # fmt: skip
        assert wait_for(lambda: _rows(browser, "devices")[-1].startswith("dev-0999"), 5.0)
        search = browser.find_element("id", "filter")
        search.send_keys("dev-0500")
        assert wait_for(lambda: [r.split()[0] for r in _rows(browser, "devices")] == ["dev-0500"])
        assert _text(browser, "footer").startswith(f"1 of {devices} devices shown")
    finally:
        dashboard.stop()
        for device in ids:
            publisher.publish(topics.device_status(fleet, device), b"", retain=True)
        for report in reports:
            publisher.publish(topics.deploy_report(fleet, report.device_id), b"", retain=True)
        publisher.publish(topics.device_status(fleet, ids[-1]), b"", retain=True).wait(10.0)
        publisher.close()


def test_the_page_shows_the_forgeries_it_refused(
    mosquitto: RunningBroker, browser: Any, tmp_path: Path
) -> None:
    fleet = "browser-sealed"
    state = tmp_path / "state.sqlite"
    board, rogue = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    registry = DeviceRegistry(state)
    registry.enroll("pi-1", raw_public_key(board))
    registry.close()
    dashboard = Dashboard(DashboardSettings(mosquitto.url, fleet, state_path=state, port=0))
    dashboard.start()
    publisher = MqttClient(mosquitto.url, "browser-sealed-publisher")
    publisher.connect()
    topic = topics.device_status(fleet, "pi-1")
    try:
        genuine = DeviceStatus("pi-1", "online", profile="jetson").encode()
        assert publisher.publish(topic, seal(board, topic, genuine)).wait(10.0)
        browser.get(dashboard.url)
        assert wait_for(lambda: len(_rows(browser, "devices")) == 1, 10.0)
        for _ in range(3):
            forged = DeviceStatus("pi-1", "offline", profile="evil").encode()
            assert publisher.publish(topic, seal(rogue, topic, forged)).wait(10.0)
        assert wait_for(lambda: "3 messages refused" in _text(browser, "seals"), 10.0), _text(
            browser, "seals"
        )
        assert _text(browser, "seals").startswith("seals checked: a status or deploy report is")
        (line,) = browser.execute_script(
            "return Array.from(document.querySelectorAll('#refused li')).map(l => l.innerText);"
        )
        assert line.startswith("3 forged messages refused in pi-1's name: bad-signature: signed")
        (row,) = _rows(browser, "devices")
        assert row.startswith("pi-1 3 refused online jetson"), row
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "dashboard-refused.png"))
    finally:
        dashboard.stop()
        publisher.close()
