"""Offline installs: `edgefl flash` ships every wheel a board needs for its CPU and Python, and
install.sh installs them with `--no-index`."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgefl import signing
from edgefl.cli import main
from edgefl.delivery import board_wheels, flash
from edgefl.delivery.board_wheels import WheelTarget, download_board_wheels, missing_requirements
from edgefl.errors import DeliveryError
from edgefl.profiles import load_profile

# Jetson's onnxruntime-gpu comes from NVIDIA's index, which the user gives (none is shipped).
JETSON_INDEX = "https://jetson-index.invalid/jp6/simple"


@pytest.fixture(autouse=True)
def jetson_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFL_EXTRA_INDEX_URLS", JETSON_INDEX)


def fake_wheel(
    folder: Path, name: str, requires: Sequence[str] = (), tag: str = "py3-none-any"
) -> Path:
    """Write a wheel holding only its METADATA (what the completeness check reads)."""
    path = folder / f"{name}-1.0-{tag}.whl"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}-1.0.dist-info/METADATA", metadata)
    return path


def test_the_shipped_profiles_name_their_boards_platform() -> None:
    pi = board_wheels.wheel_target(load_profile("raspberry-pi"))
    jetson = board_wheels.wheel_target(load_profile("jetson"))
    assert pi == WheelTarget("aarch64", "3.11", "2.36")  # Raspberry Pi OS bookworm
    assert jetson == WheelTarget("aarch64", "3.10", "2.35")  # JetPack 6: Ubuntu 22.04
    tags = pi.platforms()
    assert tags[0] == "manylinux_2_36_aarch64" and tags[-2:] == [
        "manylinux_2_17_aarch64", "manylinux2014_aarch64",
    ]  # fmt: skip
    assert len(tags) == 36 - 17 + 2


def test_the_pip_command_asks_for_the_boards_binary_wheels_only(tmp_path: Path) -> None:
    ran: list[list[str]] = []

    def run(command: list[str]) -> subprocess.CompletedProcess[str]:
        ran.append(command)
        dest = Path(command[command.index("--dest") + 1])
        fake_wheel(dest, "edgefl", ["numpy", 'onnxruntime; extra == "agent"'])
        fake_wheel(dest, "numpy", tag="cp310-cp310-manylinux_2_17_aarch64")
        fake_wheel(dest, "onnxruntime_gpu", tag="cp310-cp310-linux_aarch64")
        fake_wheel(dest, "onnxruntime", tag="cp310-cp310-manylinux_2_27_aarch64")
        fake_wheel(dest, "pip")
        return subprocess.CompletedProcess(command, 0, "", "")

    jetson = load_profile("jetson")
    wheels = download_board_wheels(
        jetson, tmp_path / "w", "/x/edgefl-0.1.0-py3-none-any.whl[agent]", run
    )
    assert [w.name.split("-")[0] for w in wheels] == [
        "edgefl", "numpy", "onnxruntime", "onnxruntime_gpu", "pip",
    ]  # fmt: skip
    (command,) = ran
    assert command[:6] == [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--only-binary=:all:",
    ]
    assert command[command.index("--python-version") + 1] == "3.10"
    assert command[command.index("--implementation") + 1] == "cp"
    platforms = [command[i + 1] for i, word in enumerate(command) if word == "--platform"]
    assert platforms == WheelTarget("aarch64", "3.10", "2.35").platforms()
    assert command[command.index("--extra-index-url") + 1] == JETSON_INDEX
    assert command[-3:] == ["/x/edgefl-0.1.0-py3-none-any.whl[agent]", "onnxruntime-gpu", "pip"]


def test_markers_are_evaluated_for_the_board_not_this_machine(tmp_path: Path) -> None:
    requires = [
        "numpy>=1.26", "tomli>=2; python_version < '3.11'", 'pillow; extra == "agent"',
        "only-x86; platform_machine == 'x86_64'", "only-arm; platform_machine == 'aarch64'",
    ]  # fmt: skip
    wheels = [fake_wheel(tmp_path, "edgefl", requires), fake_wheel(tmp_path, "numpy")]
    cp310 = WheelTarget("aarch64", "3.10", "2.35")
    cp311 = WheelTarget("aarch64", "3.11", "2.36")
    assert missing_requirements(["edgefl[agent]"], wheels, cp310) == [
        "only-arm", "pillow", "tomli>=2",
    ]  # fmt: skip
    assert missing_requirements(["edgefl"], wheels, cp311) == ["only-arm"]


def test_what_pip_left_out_is_downloaded_by_name(tmp_path: Path) -> None:
    """pip evaluates markers on this machine's Python: a 3.10 board's tomli comes second."""
    ran: list[list[str]] = []

    def run(command: list[str]) -> subprocess.CompletedProcess[str]:
        ran.append(command)
        dest = Path(command[command.index("--dest") + 1])
        if len(ran) == 1:
            fake_wheel(dest, "edgefl", ["tomli>=2; python_version < '3.11'"])
            fake_wheel(dest, "pip")
        else:
            fake_wheel(dest, "tomli")
        return subprocess.CompletedProcess(command, 0, "", "")

    board = tmp_path / "ubuntu-22.04-board"
    board.mkdir()
    (board / "profile.toml").write_text(
        'name = "ubuntu"\n[install]\narch = "aarch64"\npython = "3.10"\nglibc = "2.35"\n'
    )
    wheels = download_board_wheels(load_profile(board), tmp_path, "edgefl[agent]==0.1.0", run)
    assert [w.name.split("-")[0] for w in wheels] == ["edgefl", "pip", "tomli"]
    assert [c[-1] for c in ran] == ["pip", "tomli>=2"]


def test_a_wheel_pip_cannot_find_is_one_line(tmp_path: Path) -> None:
    def run(command: list[str]) -> subprocess.CompletedProcess[str]:
        stderr = (
            "WARNING: Location 'file:///x/' is ignored: it is neither a file nor a directory.\n"
            "ERROR: No matching distribution found for onnxruntime-gpu\n"
        )
        return subprocess.CompletedProcess(command, 1, "", stderr)

    with pytest.raises(
        DeliveryError,
        match=r"downloading the wheels for jetson \(aarch64, Python 3.10\) failed: "
        r"ERROR: No matching distribution found for onnxruntime-gpu$",
    ):
        download_board_wheels(load_profile("jetson"), tmp_path, "edgefl[agent]", run)


def test_an_unreachable_index_is_named(tmp_path: Path) -> None:
    def run(command: list[str]) -> subprocess.CompletedProcess[str]:
        stderr = (
            "WARNING: Retrying (Retry(total=0)) after connection broken by 'NameResolutionError("
            "\"HTTPSConnection(host='jetson-index.invalid', port=443): Failed to resolve\")'\n"
            "ERROR: No matching distribution found for onnxruntime-gpu\n"
        )
        return subprocess.CompletedProcess(command, 1, "", stderr)

    with pytest.raises(
        DeliveryError,
        match=r"found for onnxruntime-gpu \(pip could not reach jetson-index.invalid\)$",
    ):
        download_board_wheels(load_profile("jetson"), tmp_path, "edgefl[agent]", run)


def test_jetson_needs_the_index_of_its_gpu_runtime_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDGEFL_EXTRA_INDEX_URLS")
    with pytest.raises(DeliveryError, match="give it as EDGEFL_EXTRA_INDEX_URLS"):
        download_board_wheels(load_profile("jetson"), tmp_path, "edgefl[agent]", lambda c: None)  # type: ignore[arg-type,return-value]
    script = flash.install_script(load_profile("jetson")).decode()
    # Online, install.sh swaps in onnxruntime-gpu only with an index given (or shipped wheels).
    assert 'EXTRA_INDEX_URLS="${EDGEFL_EXTRA_INDEX_URLS:-}"' in script
    assert 'if [ -n "$EXTRA_INDEX_URLS" ] || [ -d "$HERE/wheels" ]; then' in script
    assert "keeping the runtime of edgefl[agent]" in script


def test_a_profile_naming_its_platform_in_part_is_refused(tmp_path: Path) -> None:
    board = tmp_path / "half"
    board.mkdir()
    (board / "profile.toml").write_text('name = "half"\n[install]\narch = "aarch64"\n')
    with pytest.raises(DeliveryError, match=r"only in part; add python, glibc"):
        board_wheels.wheel_target(load_profile(board))
    (board / "profile.toml").write_text(
        'name = "half"\n[install]\narch = "aarch64"\npython = "311"\nglibc = "2.36"\n'
    )
    with pytest.raises(DeliveryError, match=r"python must look like 3.11"):
        board_wheels.wheel_target(load_profile(board))


def _host_profile(tmp_path: Path) -> Path:
    """The raspberry-pi board files with this machine's own platform (so its wheels install
    here)."""
    shipped = load_profile("raspberry-pi")
    board = tmp_path / "this-machine"
    board.mkdir()
    text = (shipped.directory / "profile.toml").read_text()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    glibc = platform.libc_ver()[1]
    text = text.replace('arch = "aarch64"', f'arch = "{platform.machine()}"')
    text = text.replace('python = "3.11"', f'python = "{python}"')
    text = text.replace('glibc = "2.36"', f'glibc = "{glibc}"')
    (board / "profile.toml").write_text(text)
    for name in ("agent.env", "edgefl-agent.service"):
        (board / name).write_bytes(shipped.file(name).read_bytes())
    return board


@pytest.mark.slow
def test_the_tarball_installs_with_no_index(tmp_path: Path) -> None:
    """Built for this machine's platform, the tarball's wheels install the agent with pip's
    `--no-index`, in a clean environment (no PIP_* settings, no find-links of this machine)."""
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("needs a glibc Linux")
    key = signing.init_keys(tmp_path / "keys").public
    out = tmp_path / "agent.tar.gz"
    result = CliRunner().invoke(
        main, ["flash", "--profile", str(_host_profile(tmp_path)), "--output", str(out),
               "--trust-key", str(key), "--device-id", "here-1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with tarfile.open(out) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    root = tmp_path / "x" / "edgefl-agent"
    names = sorted(p.name for p in (root / "wheels").iterdir())
    assert all(n.endswith(".whl") for n in names)  # nothing to build from source
    assert not any(n.startswith("torch") for n in names)
    assert any(n.startswith("onnxruntime-") for n in names)
    script = (root / "install.sh").read_text()
    assert '--no-index --find-links "$HERE/wheels"' in script and "--only-binary=:all:" in script
    # install.sh's venv and pip steps, run alone into tmp_path, in a clean environment.
    steps = script[script.index("PIP=(") : script.index('if "$PREFIX/venv/bin/python" -c')]
    prefix = tmp_path / "opt"
    prelude = f"set -euo pipefail\nHERE={root}\nPREFIX={prefix}\nPYTHON={sys._base_executable}\n"
    clean = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PIP_CONFIG_FILE": os.devnull}
    done = subprocess.run(
        ["bash", "-c", prelude + steps], env=clean, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    board = prefix / "venv"
    site = board / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    # Neither setuptools nor pip in the venv the agent runs from: pip ran from its wheel.
    assert not (site / "site-packages" / "setuptools").exists()
    assert not (site / "site-packages" / "pip").exists()
    probe = subprocess.run(
        [str(board / "bin" / "python"), "-c", "import onnxruntime, PIL, edgefl.runtime"],
        env=clean, capture_output=True, text=True,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr


def test_flash_over_ssh_copies_the_wheels_folder(tmp_path: Path) -> None:
    """`edgefl flash --host` ships the same wheels: the board installs with no network."""
    key = signing.init_keys(tmp_path / "keys").public
    wheels = [fake_wheel(tmp_path, "numpy", tag="cp311-cp311-manylinux_2_17_aarch64")]
    wheels.append(fake_wheel(tmp_path, "pip"))
    settings = flash.BoardSettings("mqtt://b:1883", "lab", "pi-7")
    files = flash.build_install_files(load_profile("raspberry-pi"), settings, key, None, wheels)
    assert {n for n in files if n.startswith("wheels/")} == {f"wheels/{w.name}" for w in wheels}
    assert "every dependency from wheels/" in files["INSTALL.md"].data.decode()
    copied: list[str] = []

    def run(command: list[str]) -> subprocess.CompletedProcess[str]:
        if command[0] == "scp":
            assert "-r" in command
            sources = [Path(word) for word in command if word.startswith("/")]
            (folder,) = [p for p in sources if p.is_dir()]
            assert folder.name == "wheels"
            copied.extend(sorted(p.name for p in folder.iterdir()))
        return subprocess.CompletedProcess(command, 0, "", "")

    flash.flash_over_ssh("pi@b", files, run=run)
    assert copied == sorted(w.name for w in wheels)
