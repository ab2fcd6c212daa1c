"""Dashboard page load with a 1,000-device simulated fleet, idle and while rounds run.

A real simulation (`edgefl.simulation.runner.Simulation`: 1,000 agents and the aggregator over
Mosquitto) with the dashboard served from the same process, as `edgefl simulate --dashboard`
does. Headless Chromium (Debian's chromium + chromedriver, Selenium) loads the page repeatedly:
load time = navigation start -> the page's first full render (the `edgefl-rendered` performance
mark: every table drawn, the device list holding all devices) and -> the first frame painted
after it (`edgefl-painted`). Also measured: the server's view build and the HTTP time of
`/` and `/api/view`, and how long a round's result takes to reach an open page over the event
stream.

    .venv/bin/python benchmarks/dashboard.py [--devices 1000] [--rounds 3] [--loads 5]

Prints a table and writes benchmarks/out/dashboard.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from edgefl.core.settings import RoundPolicy
from edgefl.dashboard.service import Dashboard, DashboardSettings
from edgefl.simulation.runner import Simulation, SimulationConfig
from edgefl.simulation.workload import fl_digits_bundle, load_federated_data, repeat_pool

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from local_mosquitto import LocalMosquitto

OUT = Path(__file__).resolve().parent / "out"
FLEET = "bench-dashboard"


def chromium() -> Any:
    """Headless Chromium through Debian's chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(argument)
    service = Service(executable_path=shutil.which("chromedriver") or "chromedriver")
    return webdriver.Chrome(options=options, service=service)


def page_load(browser: Any, url: str, devices: int) -> dict[str, float]:
    """Load the page once; return ms from navigation start to the first full render, to the
    first frame painted after it, and to the load event; and whether every device is listed."""
    browser.get(url)
    for _ in range(200):  # the painted mark comes two frames after the load event at most
        marks = browser.execute_script(
            "const g = n => { const m = performance.getEntriesByName(n)[0];"
            " return m ? m.startTime : -1; };"
            "return [g('edgefl-rendered'), g('edgefl-painted'),"
            " performance.getEntriesByType('navigation')[0].loadEventEnd,"
            " document.getElementById('footer').innerText];"
        )
        if marks[1] >= 0:
            break
        time.sleep(0.01)
    rendered, painted, load_end, footer = marks
    listed = footer.startswith(f"{devices} of {devices} devices")
    return {"render_ms": rendered, "painted_ms": painted, "load_ms": load_end, "all_listed": listed}


def http_ms(url: str) -> tuple[float, int]:
    """Return the wall ms of one GET and the body's size in bytes."""
    started = time.perf_counter()
    body = urllib.request.urlopen(url, timeout=30).read()
    return 1000 * (time.perf_counter() - started), len(body)


def summary(values: list[float]) -> dict[str, float]:
    """Median and max of a list (NaN for none)."""
    if not values:
        return {"median": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(values), "max": max(values), "n": len(values)}


def main() -> None:
    """Run the benchmark and write benchmarks/out/dashboard.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loads", type=int, default=5, help="Page loads before the rounds.")
    args = parser.parse_args()
    for tool in ("mosquitto", "chromium", "chromedriver"):
        if shutil.which(tool) is None:
            sys.exit(
                f"{tool} is not installed (.ci/run installs mosquitto, chromium, chromium-driver)"
            )
    workdir = Path(tempfile.mkdtemp(prefix="edgefl-bench-dashboard-"))
    broker = LocalMosquitto(workdir, max_queued_messages=1_000_000)
    broker.start()
    browser = chromium()
    results: dict[str, Any] = {"devices": args.devices, "rounds": args.rounds}
    idle: list[dict[str, float]] = []
    busy: list[dict[str, float]] = []
    server_side: dict[str, Any] = {}
    pages: list[Dashboard] = []
    rounds_done = threading.Event()
    result_seen: list[float] = []
    result_published: list[float] = []

    def measure_idle(url: str) -> None:
        # Devices up, no round yet: the fleet is all there and nothing else runs.
        page = Dashboard(DashboardSettings(url, FLEET, port=0))
        page.start()
        pages.append(page)
        deadline = time.monotonic() + 60
        while page.source.view()["counts"]["online"] < args.devices:
            if time.monotonic() > deadline:
                raise RuntimeError("the dashboard did not see every device come online")
            time.sleep(0.1)
        started = time.perf_counter()
        text = json.dumps(page.source.view())
        server_side["view_build_ms"] = 1000 * (time.perf_counter() - started)
        server_side["view_json_bytes"] = len(text)
        index = [http_ms(page.url) for _ in range(5)]
        api = [http_ms(page.url + "api/view") for _ in range(5)]
        server_side["get_page_ms"] = summary([ms for ms, _ in index])
        server_side["page_bytes"] = index[0][1]
        server_side["get_api_view_ms"] = summary([ms for ms, _ in api])
        for _ in range(args.loads):
            idle.append(page_load(browser, page.url, args.devices))
        threading.Thread(target=watch_events, args=(page.url,), daemon=True).start()

    def watch_events(url: str) -> None:
        # An open page's event stream: when does each closed round first appear in it?
        with urllib.request.urlopen(url + "events", timeout=300) as stream:
            for line in stream:
                if line.startswith(b"data: "):
                    rounds = json.loads(line[6:])["rounds"]
                    closed = sum(1 for r in rounds if r["status"] != "running")
                    while len(result_seen) < closed:
                        result_seen.append(time.time())

    def on_round(record: Any) -> None:
        result_published.append(time.time())
        if record.round == args.rounds:
            rounds_done.set()

    config = SimulationConfig(
        devices=args.devices, broker_url=broker.url, fleet=FLEET, partition="iid",
        policy=RoundPolicy(rounds=args.rounds, deadline_s=120.0),
    )  # fmt: skip
    # FL-digits' 880 pool samples repeated to ~50 per device, as fl_digits.py's 1,000-device run.
    data = repeat_pool(load_federated_data("digits"), 50, args.devices)
    simulation = Simulation(config, fl_digits_bundle(), data,
                            on_round=on_round, before_rounds=measure_idle)  # fmt: skip
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results["simulation"] = simulation.run().summary
        except BaseException as exc:
            errors.append(exc)
            rounds_done.set()

    load_before = os.getloadavg()[0]
    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    try:
        while not pages and runner.is_alive():
            time.sleep(0.1)
        # While rounds run: load the page again and again (each load is a fresh page).
        while not rounds_done.is_set() and not errors and pages:
            busy.append(page_load(browser, pages[0].url, args.devices))
        runner.join(300)
        if errors:
            raise errors[0]
    finally:
        browser.quit()
        for page in pages:
            page.stop()
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    pairs = zip(result_seen, result_published, strict=False)  # a round the page missed: none
    lags = [seen - published for seen, published in pairs]
    results.update(
        idle=idle, during_rounds=busy, server=server_side,
        load_average_1min=[load_before, os.getloadavg()[0]], cpus=os.cpu_count(),
        idle_render_ms=summary([r["render_ms"] for r in idle]),
        busy_render_ms=summary([r["render_ms"] for r in busy]),
        idle_painted_ms=summary([r["painted_ms"] for r in idle]),
        busy_painted_ms=summary([r["painted_ms"] for r in busy]),
        result_to_page_s=summary(lags),
    )  # fmt: skip
    print(f"\nDashboard with {args.devices} simulated devices "
          f"(load average {load_before:.1f}, {os.cpu_count()} CPUs)")  # fmt: skip
    print(f"{'when':>14} {'page loads':>11} {'rendered ms':>12} {'max':>6} {'painted ms':>11}"
          f" {'max':>6} {'load event ms':>14} {'max':>6} {'all listed':>11}")  # fmt: skip
    for name, rows in (("idle", idle), ("during rounds", busy)):
        render, paint, load = (summary([r[k] for r in rows])
                               for k in ("render_ms", "painted_ms", "load_ms"))  # fmt: skip
        complete = all(r["all_listed"] for r in rows) if rows else False
        print(f"{name:>14} {render['n']:>11} {render['median']:>12.0f} {render['max']:>6.0f}"
              f" {paint['median']:>11.0f} {paint['max']:>6.0f} {load['median']:>14.0f}"
              f" {load['max']:>6.0f} {'yes' if complete else 'NO':>11}")  # fmt: skip
    page_kb = server_side["page_bytes"] / 1e3
    print(f"\nserver: view build {server_side['view_build_ms']:.1f} ms "
          f"({server_side['view_json_bytes'] / 1e3:.0f} kB JSON); GET / "
          f"{server_side['get_page_ms']['median']:.1f} ms ({page_kb:.0f} kB);"
          f" GET /api/view {server_side['get_api_view_ms']['median']:.1f} ms")  # fmt: skip
    lag = results["result_to_page_s"]
    print(f"a round's result reaches an open page in {lag['median']:.2f} s (median, max "
          f"{lag['max']:.2f} s, {lag['n']} rounds)")  # fmt: skip
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "dashboard.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {OUT / 'dashboard.json'}")


if __name__ == "__main__":
    main()
