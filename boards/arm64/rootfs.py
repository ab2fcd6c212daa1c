"""An emulated Raspberry Pi userland: a Debian bookworm arm64 root file system built with
debootstrap (cached), run under qemu-user through binfmt_misc.

Runs as root inside a private mount namespace (`test.sh` starts it with `unshare --mount`), so the
mounts made here (the overlay over the cached root, /proc, /sys, /dev, the ARM cpuinfo) vanish
with the process, whatever way it ends.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

SUITE = "bookworm"
# What install.sh needs on a Raspberry Pi OS Lite image: python3 with venv (ensurepip); nothing
# else (no compiler: wheels only; no CA certificates: the board installs offline and its broker
# is mqtt:// on the loopback). Every package costs seconds of emulated dpkg on a cold cache.
PACKAGES = ["python3", "python3-venv"]
BINFMT = Path("/proc/sys/fs/binfmt_misc")
QEMU = Path("/usr/bin/qemu-aarch64-static")
# A Raspberry Pi 4 (Cortex-A72). Under qemu-user the kernel shows the host's x86 /proc/cpuinfo,
# and onnxruntime's cpuinfo library segfaults on it at import: the board sees this one instead.
ARM_CPUINFO = (
    "".join(
        f"processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
        "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n"
        "CPU revision\t: 3\n\n"
        for n in range(4)
    )
    + "Hardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n"
)
_READY = ".edgefl-rootfs-ready"
_PATH = "/opt/edgefl/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class BoardSetupError(RuntimeError):
    """The emulated board cannot be set up on this machine (with what is missing)."""


def debian_mirror(
    sources: Sequence[Path] = (
        *sorted(Path("/etc/apt/sources.list.d").glob("*.sources")),
        *sorted(Path("/etc/apt/sources.list.d").glob("*.list")),
        Path("/etc/apt/sources.list"),
    ),
) -> str:
    """Return the Debian mirror this machine's apt uses for the main archive (not -security).

    EDGEFL_DEBIAN_MIRROR overrides it (a machine whose apt points at another distribution).

    Raises:
        BoardSetupError: no apt source names a Debian main archive.
    """
    override = os.environ.get("EDGEFL_DEBIAN_MIRROR")
    if override:
        return override
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":  # deb822: blank-line separated stanzas
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(
                    (k.strip().lower(), v.strip())
                    for k, _, v in (line.partition(":") for line in stanza.splitlines())
                    if not k.startswith("#")
                )
                if "deb" in fields.get("types", "").split() and _is_main_archive(
                    fields.get("uris", "").split(), fields.get("suites", "").split()
                ):
                    return _main_uri(fields["uris"].split())
        else:
            for line in text.splitlines():
                words = [w for w in line.split() if not w.startswith("[")]
                if (
                    len(words) >= 3
                    and words[0] == "deb"
                    and _is_main_archive([words[1]], [words[2]])
                ):
                    return words[1]
    raise BoardSetupError(
        "no Debian archive in this machine's apt sources; set EDGEFL_DEBIAN_MIRROR to one"
    )


def _is_main_archive(uris: Sequence[str], suites: Sequence[str]) -> bool:
    """A Debian archive (its path ends in /debian, not /debian-security) with a release suite."""
    return any(_is_debian(u) for u in uris) and any("-" not in s for s in suites)


def _is_debian(uri: str) -> bool:
    return uri.rstrip("/").rsplit("/", 1)[-1] == "debian"


def _main_uri(uris: Sequence[str]) -> str:
    return next(u for u in uris if _is_debian(u))


def ensure_binfmt() -> str:
    """Make the kernel run aarch64 binaries with qemu-aarch64-static; return how it does.

    Mounts binfmt_misc when it is not, and registers qemu-aarch64 (through binfmt-support, else
    directly, with the F flag so the interpreter works inside a chroot) when it is missing.

    Raises:
        BoardSetupError: qemu-user-static is not installed or registering failed.
    """
    if not QEMU.is_file():
        raise BoardSetupError(f"{QEMU} is missing: apt-get install qemu-user-static binfmt-support")
    if not (BINFMT / "status").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=True)
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists() and shutil.which("update-binfmts"):
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], check=False)
    if not entry.exists():
        magic = r"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
        mask = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
        (BINFMT / "register").write_text(f":qemu-aarch64:M::{magic}:{mask}:{QEMU}:F")
    if not entry.exists():
        raise BoardSetupError("qemu-aarch64 could not be registered with binfmt_misc")
    return entry.read_text().splitlines()[1].removeprefix("interpreter ")


def build_rootfs(cache: Path, log: Path) -> tuple[Path, float]:
    """Return the cached bookworm arm64 root file system, building it first when absent.

    Returns:
        Its path and the seconds spent building it (0 when it came from the cache).

    Raises:
        BoardSetupError: debootstrap is missing or failed (its last lines are in `log`).
    """
    rootfs = cache / f"rootfs-{SUITE}-arm64"
    # The cache holds what these packages made; another list (an edit here) builds it again.
    recipe = f"{SUITE} arm64 minbase {','.join(PACKAGES)}\n"
    if (rootfs / _READY).is_file() and (rootfs / _READY).read_text() == recipe:
        return rootfs, 0.0
    if shutil.which("debootstrap") is None:
        raise BoardSetupError("debootstrap is missing: apt-get install debootstrap")
    started = time.monotonic()
    building = cache / f"rootfs-{SUITE}-arm64.building"
    shutil.rmtree(building, ignore_errors=True)
    shutil.rmtree(rootfs, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    command = [
        "debootstrap", "--arch=arm64", "--variant=minbase", f"--include={','.join(PACKAGES)}",
        SUITE, str(building), debian_mirror(),
    ]  # fmt: skip
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-5:])
        raise BoardSetupError(f"debootstrap failed (exit {done.returncode}), see {log}:\n{tail}")
    (building / _READY).write_text(recipe)
    building.rename(rootfs)
    return rootfs, time.monotonic() - started


def mount_board(rootfs: Path, work: Path) -> Path:
    """Mount a fresh board over the cached root (an overlay: the cache stays untouched) with
    /proc (its cpuinfo an ARM one), /sys and /dev; return the board's root.

    Must run in a private mount namespace (the mounts go with it).
    """
    board = work / "board"
    upper, scratch = work / "overlay-upper", work / "overlay-work"
    for path in (board, upper, scratch):
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    options = f"lowerdir={rootfs},upperdir={upper},workdir={scratch}"
    cpuinfo = work / "cpuinfo"
    cpuinfo.write_text(ARM_CPUINFO)
    for command in (
        ["mount", "-t", "overlay", "overlay", "-o", options, str(board)],
        ["mount", "-t", "proc", "proc", str(board / "proc")],
        ["mount", "--bind", str(cpuinfo), str(board / "proc" / "cpuinfo")],
        ["mount", "--rbind", "/sys", str(board / "sys")],
        ["mount", "--rbind", "/dev", str(board / "dev")],
    ):
        subprocess.run(command, check=True)
    return board


def board_user(board: Path, name: str) -> tuple[int, int, str]:
    """Return the uid, gid and home of a user of the board (from its own /etc/passwd)."""
    for line in (board / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), int(fields[3]), fields[5]
    raise BoardSetupError(f"the board has no user {name!r}")


def board_command(
    board: Path,
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    network: bool = True,
) -> list[str]:
    """Return the command line that runs `argv` on the board.

    The environment is cleared (`env -i`): the host's PIP_*, proxies and paths must not leak in;
    `env` adds variables. `user` runs it as that board user; `network=False` runs it in a new,
    empty network namespace (no interface but a down loopback: no network at all).
    """
    command = [] if network else ["unshare", "--net"]
    command += ["chroot"]
    home = "/root"
    if user is not None:
        uid, gid, home = board_user(board, user)
        command += [f"--userspec={uid}:{gid}"]
    variables = {"PATH": _PATH, "HOME": home, "LANG": "C.UTF-8", **(env or {})}
    return [
        *command, str(board), "/usr/bin/env", "-i",
        *[f"{k}={v}" for k, v in variables.items()], *argv,
    ]  # fmt: skip
