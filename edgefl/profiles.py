"""Board profiles (`devices/*/profile.toml`): preferred artifacts, threads, limits, install.

A profile is named by its folder (`raspberry-pi`, `jetson`) or given as a path to a profile.toml.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edgefl.core.board_limits import BoardLimits
from edgefl.core.settings import from_mapping
from edgefl.errors import ProfileError
from edgefl.resources import shipped_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 boards (JetPack 6) take tomli from the base install
    import tomli as tomllib

PROFILE_FILE = "profile.toml"


@dataclass(frozen=True)
class InstallSpec:
    """What install.sh puts on a board beyond `edgefl[agent]`."""

    packages: list[str] = field(default_factory=list)
    uninstall: list[str] = field(default_factory=list)
    extra_index_urls: list[str] = field(default_factory=list)
    apt: list[str] = field(default_factory=list)
    # The board's platform, for the wheels an offline install ships (`edgefl flash`): CPU
    # architecture, Python version and glibc version of its OS. Empty: the board installs from
    # its package index.
    arch: str = ""
    python: str = ""
    glibc: str = ""


@dataclass(frozen=True)
class DeviceProfile:
    """One board family: which backbone artifacts it prefers (and so which runtime loads them),
    how many threads it runs, the most a round may ask of it (`[limits]`, defaults when absent)
    and its install files' folder."""

    name: str
    description: str
    threads: int
    prefer: list[tuple[str, str]]
    install: InstallSpec
    directory: Path
    limits: BoardLimits = field(default_factory=BoardLimits)
    # onnxruntime execution providers in order of preference; the first available runs
    # (edgefl.runtime.choose_providers). Empty: CPU only.
    providers: list[str] = field(default_factory=list)

    def file(self, name: str) -> Path:
        """Return the path of one of the profile's files (install.sh, the unit, agent.env)."""
        return self.directory / name


def _parse_preference(text: str, source: Path) -> tuple[str, str]:
    fmt, sep, precision = str(text).partition("/")
    if not sep or not fmt or not precision:
        raise ProfileError(f"{source}: preference {text!r} must look like 'format/precision'")
    return fmt, precision


_PROFILE_KEYS = {"name", "description", "threads", "prefer", "providers", "install", "limits"}
_INSTALL_KEYS = {"packages", "uninstall", "extra_index_urls", "apt", "arch", "python", "glibc"}


def parse_profile(data: dict[str, Any], directory: Path) -> DeviceProfile:
    """Build a profile from parsed TOML.

    Raises:
        ProfileError: a key is unknown (a typo would otherwise be ignored silently), a required
            key is missing, or a value has the wrong type.
    """
    source = directory / PROFILE_FILE
    limit_keys = {f.name for f in fields(BoardLimits)}
    unknown = (
        sorted(set(data) - _PROFILE_KEYS)
        + sorted(f"install.{key}" for key in set(data.get("install", {})) - _INSTALL_KEYS)
        + sorted(f"limits.{key}" for key in set(data.get("limits", {})) - limit_keys)
    )
    if unknown:
        raise ProfileError(f"{source}: unknown key {unknown[0]!r}")
    try:
        install = dict(data.get("install", {}))
        threads = int(data.get("threads", 1))
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        providers = data.get("providers", [])
        if not isinstance(providers, list) or not all(isinstance(p, str) for p in providers):
            raise ValueError(f"providers must be a list of provider names, got {providers!r}")
        return DeviceProfile(
            name=str(data["name"]),
            description=str(data.get("description", "")),
            threads=threads,
            prefer=[_parse_preference(p, source) for p in data.get("prefer", ["*/*"])],
            install=InstallSpec(
                packages=[str(p) for p in install.get("packages", [])],
                uninstall=[str(p) for p in install.get("uninstall", [])],
                extra_index_urls=[str(u) for u in install.get("extra_index_urls", [])],
                apt=[str(p) for p in install.get("apt", [])],
                arch=str(install.get("arch", "")),
                python=str(install.get("python", "")),
                glibc=str(install.get("glibc", "")),
            ),
            directory=directory,
            limits=from_mapping(BoardLimits, dict(data.get("limits", {})), what="limits"),
            providers=list(providers),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProfileError(f"{source} is invalid: {exc}") from exc


def available_profiles() -> list[str]:
    """Return the names of the shipped board profiles."""
    try:
        root = shipped_dir("devices")
    except FileNotFoundError:
        return []
    return sorted(p.parent.name for p in root.glob(f"*/{PROFILE_FILE}"))


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """Load a shipped profile by name, or a profile folder / profile.toml by path.

    Raises:
        ProfileError: no such profile, or its profile.toml is unreadable or invalid.
    """
    candidate = Path(name_or_path).expanduser()
    if candidate.name == PROFILE_FILE:
        candidate = candidate.parent
    if not (candidate / PROFILE_FILE).is_file():
        shipped = available_profiles()
        if str(name_or_path) not in shipped:
            names = ", ".join(shipped) or "none shipped"
            raise ProfileError(f"unknown device profile {str(name_or_path)!r} (known: {names})")
        candidate = shipped_dir("devices") / str(name_or_path)
    path = candidate / PROFILE_FILE
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError(f"cannot read {path}: {exc}") from exc
    return parse_profile(data, candidate)
