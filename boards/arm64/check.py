"""`make test-arm64`: edgefl on an emulated Raspberry Pi, driven through the CLI as a user would.

On a Debian bookworm arm64 root file system (debootstrap, cached) run by qemu-user:
1. `edgefl flash --output --enroll` on the host (the board's key made and enrolled there); the
   tarball's install.sh runs on the board with its network cut (`unshare --net`): every wheel
   (aarch64, CPython 3.11) comes from the tarball, none from an index, none built from source,
   no torch.
2. Against a Mosquitto on the host's loopback, the board's agent starts as its systemd unit would
   (ExecStart filled in from agent.env, as user edgefl) with no model; a signed `edgefl deploy` of
   the raspberry-pi bundle gives it only the int8 TFLite backbone (LiteRT), and it federates
   3 rounds of `edgefl aggregate` beside two x86 agents, every one of its updates accepted; a
   deploy signed with another key is refused and changes nothing.
3. A board of the jetson profile takes a signed deploy of the jetson bundle (fp16 ONNX, run by
   onnxruntime on the CPU provider after skipping TensorRT and CUDA) and a round on it.
Prints the wall times, the venv's size and each arm64 agent's peak RSS (qemu included) and writes
them to build/arm64/result.json. Exit 0 when every check passed, 1 otherwise.

Run as root through `boards/arm64/test.sh` (a private mount namespace). EDGEFL_ARM64_CACHE
(default ~/.cache/edgefl/arm64) keeps the root file system between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rootfs import (
    BoardSetupError,
    board_command,
    board_user,
    build_rootfs,
    ensure_binfmt,
    mount_board,
)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from local_mosquitto import LocalMosquitto  # type: ignore[import-not-found]  # noqa: E402

from edgefl.core.partition import partition_iid  # noqa: E402
from edgefl.data import fl_digits_split  # noqa: E402
from edgefl.transport.broker import free_port  # noqa: E402

EDGEFL = str(Path(sys.executable).parent / "edgefl")
FLEET, JETSON_FLEET = "arm64", "arm64-jetson"
PI, JETSON, X86 = "pi-arm64", "jetson-arm64", ["x86-1", "x86-2"]
ROUNDS = 3
LABELS = [str(i) for i in range(10)]
# Targets of issue 11 (printed beside the measurements).
TARGET_RSS_MB, TARGET_VENV_MB, TARGET_INSTALL_S = 200, 250, 90


class CheckFailed(AssertionError):
    """A check of the emulated board failed."""


def check(condition: bool, message: str) -> None:
    """Raise CheckFailed with `message` unless `condition`."""
    if not condition:
        raise CheckFailed(message)


@dataclass
class Run:
    """Where this run writes, and what it measured."""

    work: Path
    numbers: dict[str, float | int | str] = field(default_factory=dict)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        (self.work / "home").mkdir(parents=True, exist_ok=True)
        self.env = host_env(self.work / "home")

    def cli(self, *args: str, timeout: float = 300) -> str:
        """Run `edgefl ARGS` on the host; return its output, or fail with it."""
        done = subprocess.run(
            [EDGEFL, *args], capture_output=True, text=True, timeout=timeout, check=False,
            env=self.env,
        )  # fmt: skip
        check(
            done.returncode == 0,
            f"edgefl {args[0]} exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}",
        )
        return done.stdout

    def start(self, command: list[str], name: str) -> subprocess.Popen[bytes]:
        """Start a long-running process whose output goes to WORK/NAME.log."""
        log = (self.work / f"{name}.log").open("wb")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.processes.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> tuple[int, float]:
        """Stop one of the processes started here (`stop`) and forget it."""
        self.processes.remove(process)
        return stop(process)


def host_env(home: Path) -> dict[str, str]:
    """The environment of the host's edgefl commands: a HOME of this run's own (flash records the
    board's key under ~/.config/edgefl), with this machine's pip cache and user pip config."""
    env = dict(os.environ)
    real = Path.home()
    env["HOME"] = str(home)
    env.setdefault("PIP_CACHE_DIR", str(real / ".cache" / "pip"))
    for config in (real / ".config" / "pip" / "pip.conf", real / ".pip" / "pip.conf"):
        if config.is_file() and "PIP_CONFIG_FILE" not in env:
            env["PIP_CONFIG_FILE"] = str(config)
    return env


def stop(process: subprocess.Popen[bytes]) -> tuple[int, float]:
    """SIGTERM a process and reap it; return its exit code and peak RSS in MB (with everything it
    waited for; for a board process that is the qemu process running the agent)."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            _, status, usage = _wait4(process.pid, 30)
        except TimeoutError:
            process.kill()
            _, status, usage = _wait4(process.pid, 30)
        process.returncode = os.waitstatus_to_exitcode(status)
        return process.returncode, usage.ru_maxrss / 1024
    return process.returncode, 0.0


def _wait4(pid: int, timeout: float) -> tuple[int, int, os.struct_rusage]:  # type: ignore[name-defined]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waited, status, usage = os.wait4(pid, os.WNOHANG)
        if waited == pid:
            return waited, status, usage
        time.sleep(0.2)
    raise TimeoutError(pid)


def build_bundles(run: Run, errors: list[str]) -> None:
    """Compress digits-mlp with the shipped raspberry-pi and jetson recipes (host, torch)."""
    try:
        for recipe in ("raspberry-pi", "jetson"):
            run.cli("compress", "--model", "digits-mlp", "--recipe", recipe, "--data", "digits",
                    "--out", str(run.work / f"bundle-{recipe}"), "--force")  # fmt: skip
    except (CheckFailed, subprocess.TimeoutExpired) as exc:
        errors.append(str(exc))


def device_data(run: Run) -> dict[str, Path]:
    """Write each device's share of the FL-digits pool as the .npz `edgefl agent --data` reads."""
    _, (x, y), _ = fl_digits_split()
    names = [PI, *X86]
    parts = partition_iid(y, len(names), np.random.default_rng(0))
    paths = {}
    for name, part in zip(names, parts, strict=True):
        paths[name] = run.work / f"data-{name}.npz"
        np.savez(paths[name], X=x[part], y=y[part], labels=np.array(LABELS))
    return paths


def install_offline(run: Run, board: Path, tarball: Path) -> None:
    """Unpack the flash tarball on the board and run its install.sh with no network."""
    shutil.copy(tarball, board / "root" / "agent.tar.gz")
    script = "cd /root && tar xzf agent.tar.gz && cd edgefl-agent && ./install.sh"
    started, cpu = time.monotonic(), _children_cpu_s()
    done = subprocess.run(
        board_command(board, ["/bin/bash", "-c", script], network=False),
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    run.numbers["install_s"] = round(time.monotonic() - started, 1)
    # CPU seconds say how much work it was whatever else the machine is doing.
    run.numbers["install_cpu_s"] = round(_children_cpu_s() - cpu, 1)
    (run.work / "install.log").write_text(done.stdout + done.stderr)
    check(done.returncode == 0, f"install.sh failed offline (exit {done.returncode}):\n"
          f"{(done.stdout + done.stderr)[-3000:]}")  # fmt: skip
    python = ["/opt/edgefl/venv/bin/python", "-c"]
    probe = subprocess.run(
        board_command(board, [*python, (
            "import platform, importlib.util as u, onnxruntime, ai_edge_litert, PIL, numpy\n"
            "print(platform.machine(), platform.python_version(), u.find_spec('torch') is None)"
        )]),
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    check(probe.returncode == 0, f"the board's venv does not import its runtimes:\n{probe.stderr}")
    machine, version, no_torch = probe.stdout.split()[-3:]
    check(machine == "aarch64" and version.startswith("3.11."), f"not aarch64/3.11: {probe.stdout}")
    check(no_torch == "True", "torch ended up in the board's venv")
    venv = board / "opt" / "edgefl" / "venv"
    size = subprocess.run(["du", "-sm", str(venv)], capture_output=True, text=True, check=True)
    run.numbers["venv_mb"] = int(size.stdout.split()[0])
    with tarfile.open(tarball) as tar:
        wheels = [Path(n).name for n in tar.getnames() if n.endswith(".whl")]
    run.numbers["wheels"] = len(wheels)
    foreign = [w for w in wheels if not (w.endswith("-none-any.whl") or "aarch64" in w)]
    check(not foreign, f"the tarball holds wheels for another platform: {foreign}")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def unit_argv(board: Path, overrides: dict[str, str]) -> list[str]:
    """The agent's command line as systemd builds it from the installed unit's ExecStart and
    /etc/edgefl/agent.env (`${VAR}` one word, `$VAR` split on spaces), with `overrides`."""
    env = dict(
        line.split("=", 1)
        for line in (board / "etc" / "edgefl" / "agent.env").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    env.update(overrides)
    unit = (board / "etc" / "systemd" / "system" / "edgefl-agent.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv: list[str] = []
    for word in exec_start.removeprefix("ExecStart=").split():
        if word.startswith("${"):
            argv.append(env.get(word[2:-1], ""))
        elif word.startswith("$"):
            argv += env.get(word[1:], "").split()
        else:
            argv.append(word)
    return argv


def start_board_agent(
    run: Run, board: Path, name: str, overrides: dict[str, str]
) -> subprocess.Popen[bytes]:
    """Start the board's agent as its unit would, as user edgefl."""
    command = board_command(board, unit_argv(board, overrides), user="edgefl")
    return run.start(command, name)


def wait_online(
    run: Run, broker: str, fleet: str, state: Path, devices: list[str], timeout: float
) -> dict:
    """Wait until `devices` are online in `fleet` (`edgefl fleet --json`, their messages checked
    against the keys enrolled in the aggregator's `state`); return their rows."""
    deadline = time.monotonic() + timeout
    while True:
        listing = run.cli("fleet", "--broker", broker, "--fleet", fleet, "--state", str(state),
                          "--json")  # fmt: skip
        rows = {r["device_id"]: r for r in json.loads(listing)}
        if all(rows.get(d, {}).get("state") == "online" for d in devices):
            return rows
        for process in run.processes:
            code = process.poll()
            check(code is None, f"an agent exited early (exit {code}); logs in {run.work}")
        check(time.monotonic() < deadline, f"not online after {timeout:.0f} s: {rows}")
        time.sleep(2)


def enroll(run: Run, state: Path, devices: dict[str, Path], timeout: float = 240) -> None:
    """Enroll each device's public key (made by its agent on first start, waited for) in the
    aggregator's state, as an operator would: `edgefl devices enroll ID --key device.pub`."""
    deadline = time.monotonic() + timeout
    for device, public in devices.items():
        while not public.is_file():
            for process in run.processes:
                code = process.poll()
                check(code is None, f"an agent exited early (exit {code}); logs in {run.work}")
            check(time.monotonic() < deadline, f"{device} made no key in {timeout:.0f} s")
            time.sleep(1)
        run.cli("devices", "enroll", device, "--key", str(public), "--state", str(state))


def accepted_rounds(state: Path, device: str) -> list[tuple[int, str, str]]:
    """Return (round, outcome, code) of every update of `device` in an aggregator's record."""
    with sqlite3.connect(f"file:{state}?mode=ro", uri=True) as db:
        return db.execute(
            "SELECT round, outcome, code FROM updates WHERE device_id = ? ORDER BY round", (device,)
        ).fetchall()


def federate_on_the_pi_bundle(run: Run, board: Path, broker: str, data: dict[str, Path]) -> None:
    """Deploy the raspberry-pi bundle to the board (no model yet) and two x86 agents, then
    federate ROUNDS rounds; every update of the board must be accepted."""
    keys = run.work / "keys"
    board_data = board / "var" / "lib" / "edgefl" / "data.npz"
    shutil.copy(data[PI], board_data)
    uid, gid, _ = board_user(board, "edgefl")
    os.chown(board_data, uid, gid)
    pi = start_board_agent(run, board, PI, {
        "EDGEFL_DATA": "/var/lib/edgefl/data.npz", "EDGEFL_AGENT_ARGS": "--heartbeat 2",
    })  # fmt: skip
    x86 = [
        run.start([EDGEFL, "agent", "--broker", broker, "--fleet", FLEET, "--device-id", name,
                   "--data", str(data[name]), "--models-dir", str(run.work / f"models-{name}"),
                   "--trust-key", str(keys / "signing.pub"), "--state-dir",
                   str(run.work / f"state-{name}"), "--heartbeat", "2"], name)
        for name in X86
    ]  # fmt: skip
    out = run.work / "runs-pi"
    state = out / "state.sqlite"  # the board was enrolled there by `edgefl flash --enroll`
    started = time.monotonic()
    enroll(run, state, {n: run.work / f"state-{n}" / "device.pub" for n in X86})
    rows = wait_online(run, broker, FLEET, state, [PI, *X86], timeout=240)
    run.numbers["agent_start_s"] = round(time.monotonic() - started, 1)
    check(
        rows[PI]["model_version"] == 0 and not rows[PI]["artifact"],
        f"the board has a model: {rows[PI]}",
    )
    bundle = run.work / "bundle-raspberry-pi"
    started = time.monotonic()
    output = run.cli("deploy", str(bundle), "--broker", broker, "--fleet", FLEET, "--key",
                     str(keys / "signing.key"), "--state", str(state), "--timeout", "180",
                     timeout=300)  # fmt: skip
    run.numbers["deploy_s"] = round(time.monotonic() - started, 1)
    print(output, end="")
    current = board / "var" / "lib" / "edgefl" / "models" / "current"
    backbones = sorted(p.name for p in current.glob("backbone*"))
    check(backbones == ["backbone-int8.tflite"], f"the board took {backbones}, not the int8 TFLite")
    started = time.monotonic()
    run.cli("aggregate", "--broker", broker, "--fleet", FLEET, "--bundle", str(bundle),
            "--rounds", str(ROUNDS), "--min-devices", "3", "--deadline", "180",
            "--signing-key", str(keys / "signing.key"), "--out", str(out), timeout=900)  # fmt: skip
    run.numbers["rounds_s"] = round(time.monotonic() - started, 1)
    updates = accepted_rounds(state, PI)
    print(f"{PI} updates: {updates}")
    check([(r, o) for r, o, _ in updates] == [(n, "accepted") for n in range(1, ROUNDS + 1)],
          f"the board's updates were not all accepted: {updates}")  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"rounds: {json.dumps(metrics)[:600]}")
    row = wait_online(run, broker, FLEET, state, [PI], timeout=30)[PI]
    check((row["artifact"], row["runtime"]) == ("backbone-int8.tflite", "litert"),
          f"the board does not say it runs the int8 TFLite in LiteRT: {row}")  # fmt: skip
    refuse_a_wrongly_signed_deploy(run, board, broker, state)
    code, rss = run.stop(pi)
    check(code == 0, f"the board's agent exited {code} on SIGTERM (see {run.work}/{PI}.log)")
    run.numbers["pi_agent_peak_rss_mb"] = round(rss, 1)
    # The same agent natively (x86, the host's venv), for scale: qemu adds its own memory.
    run.numbers["x86_agent_peak_rss_mb"] = round(max(run.stop(p)[1] for p in x86), 1)


def refuse_a_wrongly_signed_deploy(run: Run, board: Path, broker: str, state: Path) -> None:
    """A release signed with a key the board does not trust is refused and changes nothing."""
    rogue = run.work / "rogue-keys"
    run.cli("keys", "init", "--dir", str(rogue))
    done = subprocess.run(
        [EDGEFL, "deploy", str(run.work / "bundle-jetson"), "--broker", broker, "--fleet", FLEET,
         "--devices", PI, "--key", str(rogue / "signing.key"), "--state", str(state),
         "--timeout", "60"],
        capture_output=True, text=True, timeout=120, check=False, env=run.env,
    )  # fmt: skip
    print(done.stdout, end="")
    check(done.returncode == 1, f"a wrongly signed deploy exited {done.returncode}, not 1")
    check("signature" in done.stdout, "the board's refusal does not name the signature")
    current = board / "var" / "lib" / "edgefl" / "models" / "current"
    backbones = sorted(p.name for p in current.glob("backbone*"))
    check(backbones == ["backbone-int8.tflite"], f"a wrongly signed deploy changed {backbones}")


def round_on_the_jetson_bundle(run: Run, board: Path, broker: str) -> None:
    """A jetson-profile board (no model) takes a signed deploy of the jetson bundle, loads its
    fp16 ONNX in onnxruntime and answers a round."""
    keys = run.work / "keys"
    jetson = start_board_agent(run, board, JETSON, {
        "EDGEFL_DATA": "/var/lib/edgefl/data.npz", "EDGEFL_PROFILE": "jetson",
        "EDGEFL_DEVICE_ID": JETSON, "EDGEFL_FLEET": JETSON_FLEET,
        "EDGEFL_MODELS_DIR": "/var/lib/edgefl/models-jetson",
        "EDGEFL_STATE_DIR": "/var/lib/edgefl/state-jetson", "EDGEFL_AGENT_ARGS": "--heartbeat 2",
    })  # fmt: skip
    out = run.work / "runs-jetson"
    state = out / "state.sqlite"
    out.mkdir()
    enroll(run, state, {JETSON: board / "var" / "lib" / "edgefl" / "state-jetson" / "device.pub"})
    wait_online(run, broker, JETSON_FLEET, state, [JETSON], timeout=240)
    bundle = run.work / "bundle-jetson"
    print(run.cli("deploy", str(bundle), "--broker", broker, "--fleet", JETSON_FLEET, "--key",
                  str(keys / "signing.key"), "--state", str(state), "--timeout", "180",
                  timeout=300), end="")  # fmt: skip
    current = board / "var" / "lib" / "edgefl" / "models-jetson" / "current"
    backbones = sorted(p.name for p in current.glob("backbone*"))
    check(backbones == ["backbone-fp16.onnx"], f"the jetson board took {backbones}, not fp16 ONNX")
    run.cli("aggregate", "--broker", broker, "--fleet", JETSON_FLEET, "--bundle", str(bundle),
            "--rounds", "1", "--min-devices", "1", "--deadline", "180", "--signing-key",
            str(keys / "signing.key"), "--out", str(out), timeout=600)  # fmt: skip
    updates = accepted_rounds(state, JETSON)
    check([(r, o) for r, o, _ in updates] == [(1, "accepted")], f"jetson round: {updates}")
    row = wait_online(run, broker, JETSON_FLEET, state, [JETSON], timeout=30)[JETSON]
    print(f"{JETSON} runs: {row['artifact']} {row['runtime']}/{row['provider']}")
    check((row["artifact"], row["runtime"], row["provider"])
          == ("backbone-fp16.onnx", "onnxruntime", "CPUExecutionProvider"),
          f"the jetson board does not run the fp16 ONNX on the CPU provider: {row}")  # fmt: skip
    code, rss = run.stop(jetson)
    check(code == 0, f"the jetson agent exited {code} on SIGTERM (see {run.work}/{JETSON}.log)")
    run.numbers["jetson_agent_peak_rss_mb"] = round(rss, 1)


def report(numbers: dict[str, float | int | str]) -> None:
    """Print the measurements beside issue 11's targets."""
    rows = [
        ("root file system (debootstrap; 0 = cached)", f"{numbers.get('rootfs_s', '-')} s", ""),
        ("offline install (install.sh, network cut)", f"{numbers.get('install_s', '-')} s",
         f"<= {TARGET_INSTALL_S} s"),
        ("  its CPU time", f"{numbers.get('install_cpu_s', '-')} s", ""),
        ("wheels in the flash tarball", f"{numbers.get('wheels', '-')}", ""),
        ("edgefl[agent] venv on the board", f"{numbers.get('venv_mb', '-')} MB",
         f"<= {TARGET_VENV_MB} MB"),
        ("agent peak RSS, raspberry-pi bundle", f"{numbers.get('pi_agent_peak_rss_mb', '-')} MB",
         f"<= {TARGET_RSS_MB} MB"),
        ("agent peak RSS, jetson bundle", f"{numbers.get('jetson_agent_peak_rss_mb', '-')} MB", ""),
        ("x86 agent peak RSS, native (for scale)",
         f"{numbers.get('x86_agent_peak_rss_mb', '-')} MB", ""),
        ("agent start to online (qemu)", f"{numbers.get('agent_start_s', '-')} s", ""),
        ("3 rounds with the arm64 board", f"{numbers.get('rounds_s', '-')} s", ""),
        ("total wall time", f"{numbers.get('total_s', '-')} s", "< 600 s cold"),
        ("load average (5 min) at the end", f"{numbers.get('load_average', '-')}", ""),
    ]  # fmt: skip
    print("\narm64 board under qemu-user (RSS includes qemu's own memory)")
    for name, value, target in rows:
        print(f"  {name:<44} {value:>10}  {target}")


def main() -> int:
    """Run every check; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_cache = Path(os.environ.get("EDGEFL_ARM64_CACHE", "~/.cache/edgefl/arm64"))
    parser.add_argument("--cache", type=Path, default=default_cache.expanduser())
    parser.add_argument("--work", type=Path, default=REPO / "build" / "arm64")
    args = parser.parse_args()
    started = time.monotonic()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    run = Run(args.work.resolve())
    broker: LocalMosquitto | None = None
    try:
        print(f"qemu-aarch64 through binfmt_misc: {ensure_binfmt()}")
        run.cli("keys", "init", "--dir", str(run.work / "keys"))
        errors: list[str] = []
        # The bundles need torch, the root file system needs debootstrap: side by side.
        bundles = threading.Thread(target=build_bundles, args=(run, errors))
        bundles.start()
        rootfs, built_s = build_rootfs(args.cache, run.work / "debootstrap.log")
        run.numbers["rootfs_s"] = round(built_s, 1)
        how = f"built in {built_s:.0f} s" if built_s else "cached"
        print(f"root file system: {rootfs} ({how})")
        bundles.join()
        check(not errors, "; ".join(errors))
        board = mount_board(rootfs, run.work)
        (run.work / "broker").mkdir()
        broker = LocalMosquitto(run.work / "broker", port=free_port())
        tarball = run.work / "agent.tar.gz"
        (run.work / "runs-pi").mkdir()
        print(run.cli("flash", "--profile", "raspberry-pi", "--output", str(tarball), "--broker",
                      broker.url, "--fleet", FLEET, "--device-id", PI, "--trust-key",
                      str(run.work / "keys" / "signing.pub"), "--enroll",
                      str(run.work / "runs-pi" / "state.sqlite")), end="")  # fmt: skip
        install_offline(run, board, tarball)
        print(f"installed offline in {run.numbers['install_s']} s: {run.numbers['wheels']} wheels,"
              f" venv {run.numbers['venv_mb']} MB")  # fmt: skip
        broker.start()
        federate_on_the_pi_bundle(run, board, broker.url, device_data(run))
        round_on_the_jetson_bundle(run, board, broker.url)
    except (CheckFailed, BoardSetupError, subprocess.TimeoutExpired) as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        for process in run.processes:
            if process.poll() is None:
                stop(process)
        if broker is not None:
            broker.stop()
        run.numbers["total_s"] = round(time.monotonic() - started, 1)
        run.numbers["load_average"] = round(os.getloadavg()[1], 2)  # over the last 5 minutes
        report(run.numbers)
        (run.work / "result.json").write_text(json.dumps(run.numbers, indent=2) + "\n")
    # The board's installed files (~400 MB) are kept only when a check failed, to look into.
    subprocess.run(["umount", "--recursive", str(run.work / "board")], check=False)
    for name in ("overlay-upper", "overlay-work"):
        shutil.rmtree(run.work / name, ignore_errors=True)
    print("\narm64 board: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
