"""The wheels a board installs offline: `edgefl[agent]` and its profile's runtime, for the board's
CPU, Python and glibc, downloaded on the host by pip (binary wheels only, never a source build).

pip evaluates environment markers (`tomli; python_version < '3.11'`) against the interpreter that
runs it, not the board's, so after each download the set is checked against the board's
environment (`missing_requirements`) and what is missing is downloaded by name.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

from edgefl.errors import DeliveryError
from edgefl.profiles import DeviceProfile

# manylinux_2_17 (= manylinux2014) is the oldest glibc aarch64 wheels are built for.
_OLDEST_GLIBC_MINOR = 17
# Passes of "download what is missing" before giving up (each adds a level of dependencies).
_MAX_PASSES = 4
WHEELS_DIR = "wheels"


@dataclass(frozen=True)
class WheelTarget:
    """A board's platform as wheels see it: CPU architecture, Python `X.Y`, glibc `2.N`."""

    arch: str
    python: str
    glibc: str

    def platforms(self) -> list[str]:
        """Return the platform tags pip may take, newest first: manylinux_2_N down to 2_17
        (pip does not expand `manylinux_2_N` to older glibc versions by itself)."""
        major, _, minor = self.glibc.partition(".")
        newest = int(minor)
        tags = [
            f"manylinux_{major}_{m}_{self.arch}" for m in range(newest, _OLDEST_GLIBC_MINOR - 1, -1)
        ]
        return [*tags, f"manylinux2014_{self.arch}"]

    def environment(self) -> dict[str, str]:
        """Return the board's marker environment (PEP 508) for checking what it needs."""
        return {
            "python_version": self.python,
            "python_full_version": f"{self.python}.0",
            "platform_machine": self.arch,
            "platform_system": "Linux",
            "sys_platform": "linux",
            "os_name": "posix",
            "implementation_name": "cpython",
            "platform_python_implementation": "CPython",
        }


def wheel_target(profile: DeviceProfile) -> WheelTarget | None:
    """Return the board's platform from its profile's `[install]` (`arch`, `python`, `glibc`),
    or None when the profile names none (the board then installs from its package index).

    Raises:
        DeliveryError: only some of the three are given, or one is malformed.
    """
    spec = profile.install
    given = {"arch": spec.arch, "python": spec.python, "glibc": spec.glibc}
    if not any(given.values()):
        return None
    missing = [key for key, value in given.items() if not value]
    if missing:
        raise DeliveryError(
            f"profile {profile.name}: [install] names the board's platform only in part;"
            f' add {", ".join(missing)} (e.g. arch = "aarch64", python = "3.11", glibc = "2.36")'
        )
    if not re.fullmatch(r"3\.\d+", spec.python) or not re.fullmatch(r"2\.\d+", spec.glibc):
        raise DeliveryError(
            f"profile {profile.name}: python must look like 3.11 and glibc like 2.36,"
            f" not {spec.python!r} and {spec.glibc!r}"
        )
    if not re.fullmatch(r"[a-z0-9_]+", spec.arch):
        raise DeliveryError(f"profile {profile.name}: arch {spec.arch!r} is not a CPU name")
    return WheelTarget(spec.arch, spec.python, spec.glibc)


def download_command(
    target: WheelTarget,
    requirements: Sequence[str],
    dest: Path,
    extra_index_urls: Sequence[str] = (),
) -> list[str]:
    """Return the `pip download` command line that fetches `requirements` for `target`.

    pip uses this machine's own configuration (index, proxies, certificates); the profile's
    extra indexes are added to it.
    """
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:"]
    for tag in target.platforms():
        command += ["--platform", tag]
    command += ["--python-version", target.python, "--implementation", "cp"]
    for url in extra_index_urls:
        command += ["--extra-index-url", url]
    return [*command, "--dest", str(dest), *requirements]


def _wheel_requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(name).decode("utf-8"))
    return metadata.get_all("Requires-Dist") or []


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_name(wheel: Path) -> str:
    return _canonical(wheel.name.split("-", 1)[0])


def missing_requirements(
    roots: Iterable[str], wheels: Iterable[Path], target: WheelTarget
) -> list[str]:
    """Return the requirements the board needs that no wheel in `wheels` provides.

    Walks from `roots` (requirement strings, extras included) through each wheel's Requires-Dist,
    evaluating markers for the board's environment, not this machine's.
    """
    from packaging.requirements import Requirement

    by_name = {_wheel_name(w): w for w in wheels}
    environment = target.environment()
    missing: dict[str, str] = {}
    seen: set[tuple[str, str]] = set()
    queue = [(Requirement(text), "") for text in roots]
    while queue:
        requirement, extra = queue.pop()
        marker = requirement.marker
        if marker is not None and not marker.evaluate({**environment, "extra": extra}):
            continue
        name = _canonical(requirement.name)
        wheel = by_name.get(name)
        if wheel is None:
            missing.setdefault(name, str(requirement).split(";")[0].strip())
            continue
        for wanted in ("", *sorted(requirement.extras)):
            if (name, wanted) in seen:
                continue
            seen.add((name, wanted))
            queue += [(Requirement(text), wanted) for text in _wheel_requirements(wheel)]
    return sorted(missing.values())


Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=1800)


def download_board_wheels(
    profile: DeviceProfile,
    dest: Path,
    edgefl_requirement: str,
    run: Runner = _run,
) -> list[Path]:
    """Download every wheel a board of `profile` installs: edgefl with its `agent` extra, the
    profile's runtime packages and pip itself.

    Args:
        profile: names the board's platform (`wheel_target`) and its runtime packages and indexes.
        dest: the folder the wheels go to.
        edgefl_requirement: `PATH/edgefl-X.whl[agent]` for a built wheel, else
            `edgefl[agent]==X` from the index.
        run: runs one command line (tests pass their own).

    Returns:
        The wheels in `dest`, sorted by name.

    Raises:
        DeliveryError: the profile names no platform, pip failed (with its last error line), or
            a requirement of the board still has no wheel after the passes.
    """
    if profile.install.packages and not extra_indexes(profile):
        raise DeliveryError(
            f"profile {profile.name} installs {', '.join(profile.install.packages)} from an extra "
            "package index: give it as EDGEFL_EXTRA_INDEX_URLS (space-separated URLs)"
        )
    target = wheel_target(profile)
    if target is None:
        raise DeliveryError(
            f"profile {profile.name} names no platform ([install] arch, python, glibc):"
            " there is nothing to download wheels for"
        )
    dest.mkdir(parents=True, exist_ok=True)
    roots = [edgefl_requirement, *profile.install.packages, "pip"]
    wanted = roots
    for _ in range(_MAX_PASSES):
        command = download_command(target, wanted, dest, extra_indexes(profile))
        done = run(command)
        if done.returncode != 0:
            raise DeliveryError(
                f"downloading the wheels for {profile.name} ({target.arch}, Python"
                f" {target.python}) failed: {_pip_error(done.stderr or done.stdout or '')}"
            )
        local_roots = [_local_requirement(r) for r in roots]
        wanted = missing_requirements(local_roots, dest.glob("*.whl"), target)
        if not wanted:
            return sorted(dest.glob("*.whl"))
    raise DeliveryError(
        f"no wheel for {', '.join(wanted)} on {profile.name} ({target.arch}, Python"
        f" {target.python}) after {_MAX_PASSES} downloads"
    )


def extra_indexes(profile: DeviceProfile) -> list[str]:
    """The extra package indexes of a board's packages: EDGEFL_EXTRA_INDEX_URLS (space-separated)
    when set, else the profile's `extra_index_urls` (no index host is shipped in a profile)."""
    given = os.environ.get("EDGEFL_EXTRA_INDEX_URLS", "").split()
    return given or list(profile.install.extra_index_urls)


def _pip_error(output: str) -> str:
    """Return pip's last error line, naming the index hosts it could not reach (a missing
    package and an unreachable index both end in "No matching distribution")."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "is ignored" not in line]
    last = errors[-1] if errors else "no output"
    unreachable = sorted(set(re.findall(r"host='([^']+)'", output)))
    if unreachable:
        last += f" (pip could not reach {', '.join(unreachable)})"
    return last


def _local_requirement(requirement: str) -> str:
    """Turn `PATH/edgefl-X.whl[agent]` into `edgefl[agent]` for the completeness check."""
    path, bracket, extras = requirement.partition("[")
    if path.endswith(".whl"):
        return _wheel_name(Path(path)) + bracket + extras
    return requirement
