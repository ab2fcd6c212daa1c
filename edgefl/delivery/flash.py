"""Install the agent on a board: the files of its profile, filled in, copied with ssh/scp or packed
into an offline tarball with instructions.

The command lines are built by pure functions (`ssh_commands`) so they can be checked without a
board; `flash_over_ssh` only runs them.
"""

from __future__ import annotations

import io
import shlex
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import edgefl
from edgefl.atomic import replacing
from edgefl.delivery.board_wheels import WHEELS_DIR, download_board_wheels, wheel_target
from edgefl.delivery.install_script import INSTALL_SCRIPT, install_script
from edgefl.errors import DeliveryError, InputError, KeyFileError, ProfileError
from edgefl.profiles import DeviceProfile
from edgefl.signing import public_pem
from edgefl.transport import topics
from edgefl.transport.broker import parse_broker_url
from edgefl.transport.tls import TlsSettings, check_tls

UNIT_FILE = "edgefl-agent.service"
ENV_FILE = "agent.env"
PUBLIC_KEY_NAME = "signing.pub"
# The board's own Ed25519 key, made by flash (install.sh puts it in the agent's state directory
# as device.key/device.pub unless the board has one): its identity, enrolled on the aggregator.
BOARD_KEY_NAME, BOARD_PUBLIC_KEY_NAME = "board-signing.key", "board-signing.pub"
REMOTE_DIR = "edgefl-install"
TARBALL_ROOT = "edgefl-agent"
# Where install.sh puts a board's TLS files; agent.env points the agent at them.
BOARD_TLS_DIR = "/etc/edgefl/tls"
# TlsSettings attribute -> (name in the bundle and under BOARD_TLS_DIR, mode, the agent's flag).
TLS_FILES = {
    "cafile": ("ca.crt", 0o644, "--cafile"),
    "certfile": ("device.crt", 0o644, "--cert"),
    "keyfile": ("device.key", 0o600, "--key"),
}
TLS_ARGS_KEY = "EDGEFL_TLS_ARGS"
_SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]


@dataclass(frozen=True)
class InstallFile:
    """One file to put on the board."""

    data: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class BoardSettings:
    """What goes into agent.env for one board, and the TLS files it gets (`tls`: files on this
    machine, shipped to the board; none given: the agent uses the system CAs, no certificate)."""

    broker: str
    fleet: str
    device_id: str
    group: str = ""
    tls: TlsSettings = field(default_factory=TlsSettings)


def render_agent_env(template: str, values: Mapping[str, str]) -> str:
    """Return the agent.env template with the values of the given keys replaced.

    Lines keep their order and comments; a key not in the template is appended.
    """
    lines = template.splitlines()
    done = set()
    for index, line in enumerate(lines):
        key, sep, _ = line.partition("=")
        if sep and not line.lstrip().startswith("#") and key.strip() in values:
            lines[index] = f"{key.strip()}={values[key.strip()]}"
            done.add(key.strip())
    lines += [f"{key}={value}" for key, value in values.items() if key not in done]
    return "\n".join(lines) + "\n"


def _env_values(profile: DeviceProfile, settings: BoardSettings) -> dict[str, str]:
    for value, what in ((settings.fleet, "fleet"), (settings.device_id, "device ID")):
        try:
            topics.check_name(value, what)
        except ValueError as exc:
            raise DeliveryError(str(exc)) from None
    values = {
        "EDGEFL_BROKER": settings.broker,
        "EDGEFL_FLEET": settings.fleet,
        "EDGEFL_DEVICE_ID": settings.device_id,
        "EDGEFL_PROFILE": profile.name,
        "EDGEFL_THREADS": str(profile.threads),
    }
    if settings.group:
        values["EDGEFL_AGENT_ARGS"] = f"--group {settings.group}"
    values[TLS_ARGS_KEY] = tls_agent_args(settings.tls)
    for key, value in values.items():
        if any(ch.isspace() for ch in value) and key not in ("EDGEFL_AGENT_ARGS", TLS_ARGS_KEY):
            raise DeliveryError(f"{key} must not contain spaces: {value!r}")
    return values


def tls_agent_args(tls: TlsSettings) -> str:
    """Return the agent's TLS flags for agent.env, pointing at the files install.sh puts in
    BOARD_TLS_DIR ("" when no file is given: the unit then adds no flag)."""
    words = []
    for attribute, (name, _, flag) in TLS_FILES.items():
        if getattr(tls, attribute):
            words += [flag, f"{BOARD_TLS_DIR}/{name}"]
    return " ".join(words)


def _tls_files(tls: TlsSettings) -> dict[str, InstallFile]:
    files = {}
    for attribute, (name, mode, _) in TLS_FILES.items():
        path = getattr(tls, attribute)
        if path:
            try:
                files[name] = InstallFile(Path(path).expanduser().read_bytes(), mode)
            except OSError as exc:
                raise InputError(f"`{attribute}` {path}: {exc.strerror or exc}") from None
    return files


def default_device_id(profile: DeviceProfile, host: str | None) -> str:
    """Return the device ID a board gets when none is given.

    Args:
        profile: the board profile; its agent.env template names an example device.
        host: USER@HOST being flashed, or None for an offline bundle.

    Returns:
        The host's short name (`pi@kitchen.local` gives `kitchen`), else the template's
        EDGEFL_DEVICE_ID.

    Raises:
        DeliveryError: the profile has no agent.env, or it names no device and there is no host.
    """
    if host is not None:
        return host.rpartition("@")[2].split(".")[0]
    template = _env_template(profile)
    for line in template.splitlines():
        if line.startswith("EDGEFL_DEVICE_ID=") and line.partition("=")[2]:
            return line.partition("=")[2]
    raise InputError("no device ID: the profile names none and there is no host; give `device_id`")


def _env_template(profile: DeviceProfile) -> str:
    path = profile.file(ENV_FILE)
    if not path.is_file():
        raise ProfileError(f"profile {profile.name} has no {ENV_FILE} in {profile.directory}")
    return path.read_text()


def install_guide(
    profile: DeviceProfile, settings: BoardSettings, wheel: str | None, offline: bool = False
) -> str:
    """Return INSTALL.md: how to install the offline bundle on a board (`offline`: every wheel
    is in wheels/ and pip does not use the network)."""
    package = f"the bundled wheel `{wheel}`" if wheel else "`edgefl[agent]` from the package index"
    if offline:
        package += (
            f"\nand every dependency from {WHEELS_DIR}/ (`pip install --no-index`: the board needs"
            " no network to install)"
        )
    docker = ""
    if (profile.directory / "Dockerfile").is_file():
        docker = (
            "\n## Or as a container\n\nThe `Dockerfile` here builds the agent on the board's L4T "
            "base image; its header says how to build and run it.\n"
        )
    enroll_key = f"~/.config/edgefl/devices/{settings.fleet}/{settings.device_id}.pub"
    tls_text, operator = "", ""
    if settings.tls.given:
        names = [name for a, (name, _, _) in TLS_FILES.items() if getattr(settings.tls, a)]
        tls_text = (
            f"puts the TLS files {', '.join(names)} in {BOARD_TLS_DIR}/ (the key 0600, readable\n"
            "by the agent's user only; `EDGEFL_TLS_ARGS` in agent.env points the agent at them),\n"
        )
        operator = " with an operator certificate (`--cafile`, `--cert`, `--key`)"
    return f"""# edgefl agent for {profile.description or profile.name}

Device `{settings.device_id}` of fleet `{settings.fleet}`, broker `{settings.broker}`.

## Install

Copy this folder to the board, then on the board:

```
tar xzf agent.tar.gz && cd {TARBALL_ROOT}
sudo ./install.sh
```

`install.sh` creates a virtual environment in /opt/edgefl/venv, installs {package}
with the board's runtime (no torch), writes /etc/edgefl/agent.env and /etc/edgefl/signing.pub,
{tls_text}and enables the `edgefl-agent` systemd service, which restarts the agent after crashes
and reboots.

## Then

- Put local labelled data in /var/lib/edgefl/data (one folder per label), or set `EDGEFL_DATA`
  in /etc/edgefl/agent.env, then `sudo systemctl restart edgefl-agent`.
- Follow the agent: `journalctl -u edgefl-agent -f`.
- On the aggregator, enroll the board's key (`edgefl flash` printed where its public half is):
  `edgefl devices enroll {settings.device_id} --key {enroll_key} --state STATE`;
  the agent seals everything it sends with it, and the aggregator believes only enrolled keys.
- From the host: `edgefl fleet --broker {settings.broker} --fleet {settings.fleet}`{operator} shows
  the board once it is online; `edgefl deploy BUNDLE --broker ... --fleet {settings.fleet}` ships
  it a model signed with the key whose public half is `signing.pub`.
{docker}"""


def build_install_files(
    profile: DeviceProfile,
    settings: BoardSettings,
    trust_key: Path,
    wheel: Path | None = None,
    wheels: Sequence[Path] = (),
    board_key: Ed25519PrivateKey | None = None,
) -> dict[str, InstallFile]:
    """Collect the files to install on one board, with agent.env filled in.

    Args:
        profile: the board profile (its folder holds the unit and agent.env, and may hold its
            own install.sh; without one, install.sh is written from the template).
        settings: broker, fleet, device ID and group for agent.env, and the TLS files to ship
            (named ca.crt, device.crt and device.key in the bundle).
        trust_key: the public key the agent will trust.
        wheel: an edgefl wheel to ship; None installs edgefl from the index.
        wheels: every other wheel the board installs (`board_wheels.download_board_wheels`),
            shipped in wheels/: install.sh then installs with `--no-index`, offline.
        board_key: the board's own key (its identity: statuses and updates are sealed with it);
            None leaves it to the agent, which makes one on first start.

    Returns:
        File name -> contents and mode.

    Raises:
        DeliveryError: a profile file or the key is missing, or a setting is invalid.
        BrokerUrlError: the broker URL is malformed, or TLS files are given with an mqtt:// URL
            or without their pair.
    """
    check_tls(parse_broker_url(settings.broker), settings.tls)
    files = {INSTALL_SCRIPT: InstallFile(install_script(profile), 0o755)}
    for name, mode in ((UNIT_FILE, 0o644), ("Dockerfile", 0o644)):
        path = profile.file(name)
        if path.is_file():
            files[name] = InstallFile(path.read_bytes(), mode)
        elif name != "Dockerfile":
            raise ProfileError(f"profile {profile.name} has no {name} in {profile.directory}")
    if settings.tls.given and f"${TLS_ARGS_KEY}" not in files[UNIT_FILE].data.decode():
        raise ProfileError(
            f"profile {profile.name}: its {UNIT_FILE} does not pass ${TLS_ARGS_KEY} to the agent,"
            " so the board would ignore its TLS files"
        )
    files.update(_tls_files(settings.tls))
    env = render_agent_env(_env_template(profile), _env_values(profile, settings))
    # agent.env may hold broker credentials (a password in the URL): root's alone.
    files[ENV_FILE] = InstallFile(env.encode(), 0o600)
    try:
        files[PUBLIC_KEY_NAME] = InstallFile(Path(trust_key).expanduser().read_bytes(), 0o644)
    except OSError:
        raise KeyFileError(
            f"public key {trust_key} not found (create one with `edgefl keys init`"
            " or give `trust_key`)"
        ) from None
    if board_key is not None:
        private = board_key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())  # fmt: skip
        files[BOARD_KEY_NAME] = InstallFile(private, 0o600)
        files[BOARD_PUBLIC_KEY_NAME] = InstallFile(public_pem(board_key.public_key()), 0o644)
    if wheel is not None:
        files[wheel.name] = InstallFile(wheel.read_bytes(), 0o644)
    for path in wheels:
        if wheel is None or path.name != wheel.name:
            files[f"{WHEELS_DIR}/{path.name}"] = InstallFile(path.read_bytes(), 0o644)
    guide = install_guide(profile, settings, wheel.name if wheel else None, offline=bool(wheels))
    files["INSTALL.md"] = InstallFile(guide.encode(), 0o644)
    return files


def source_root() -> Path | None:
    """Return the repository root when edgefl runs from a source checkout, else None."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "edgefl").is_dir() else None


def build_wheel(out_dir: Path) -> Path | None:
    """Build an edgefl wheel from the source checkout into `out_dir` (no dependencies).

    Returns:
        The wheel, or None when edgefl is not running from a source checkout (boards then
        install `edgefl[agent]` from the package index).

    Raises:
        DeliveryError: pip could not build it.
    """
    root = source_root()
    if root is None:
        return None
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "-q",
        "-w",
        str(out_dir),
        str(root),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(out_dir.glob("edgefl-*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DeliveryError(f"building the edgefl wheel failed: {last}")
    return wheels[-1]


def board_wheels(profile: DeviceProfile, out_dir: Path) -> tuple[Path | None, list[Path]]:
    """Return the edgefl wheel to ship (None: from the index) and every other wheel the board
    installs, downloaded for its platform (none when its profile names no platform).

    Raises:
        DeliveryError: the wheel cannot be built or a wheel cannot be downloaded.
    """
    wheel = build_wheel(out_dir)
    if wheel_target(profile) is None:
        return wheel, []
    requirement = f"{wheel}[agent]" if wheel else f"edgefl[agent]=={edgefl.__version__}"
    return wheel, download_board_wheels(profile, out_dir / WHEELS_DIR, requirement)


def write_offline_bundle(files: Mapping[str, InstallFile], output: Path) -> Path:
    """Write the files as a .tar.gz under one folder, atomically.

    Raises:
        DeliveryError: the output cannot be written.
    """
    output = Path(output)
    try:
        with (
            replacing(output) as tmp,
            tmp.open("wb") as handle,
            tarfile.open(fileobj=handle, mode="w:gz") as tar,
        ):
            for name, item in sorted(files.items()):
                info = tarfile.TarInfo(f"{TARBALL_ROOT}/{name}")
                info.size = len(item.data)
                info.mode = item.mode
                tar.addfile(info, io.BytesIO(item.data))
    except OSError as exc:
        raise DeliveryError(f"cannot write {output}: {exc.strerror or exc}") from exc
    return output


def ssh_commands(
    host: str,
    local_files: Sequence[Path],
    port: int | None = None,
    identity: Path | None = None,
    remote_dir: str = REMOTE_DIR,
) -> list[list[str]]:
    """Return the command lines that install the agent on `host` (USER@HOST) over ssh/scp.

    1. create the remote folder, empty (a wheel left by an earlier flash would be installed
    instead of the new one), 2. copy the files into it, 3. run install.sh with sudo.
    BatchMode makes a missing key fail at once instead of waiting for a password prompt.
    """
    ssh = ["ssh", *_SSH_OPTIONS]
    scp = ["scp", "-q", "-r", *_SSH_OPTIONS]
    if port is not None:
        ssh += ["-p", str(port)]
        scp += ["-P", str(port)]
    if identity is not None:
        ssh += ["-i", str(identity)]
        scp += ["-i", str(identity)]
    quoted = shlex.quote(remote_dir)
    return [
        [*ssh, host, f"rm -rf {quoted} && mkdir -p {quoted}"],
        [*scp, *[str(p) for p in local_files], f"{host}:{remote_dir}/"],
        [*ssh, host, f"cd {quoted} && sudo ./{INSTALL_SCRIPT}"],
    ]


Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=900)


def flash_over_ssh(
    host: str,
    files: Mapping[str, InstallFile],
    port: int | None = None,
    identity: Path | None = None,
    run: Runner = _run,
    on_step: Callable[[str], None] | None = None,
) -> None:
    """Copy the install files to `host` and run install.sh there.

    Args:
        host: USER@HOST (as ssh takes it).
        files: from `build_install_files`.
        port: ssh port (default 22).
        identity: an ssh private key file.
        run: runs one command line (tests pass their own).
        on_step: told what is happening, step by step.

    Raises:
        DeliveryError: ssh or scp is missing, or a step failed (with ssh's last error line).
    """
    with tempfile.TemporaryDirectory(prefix="edgefl-flash-") as tmp:
        paths = []
        for name, item in files.items():
            path = Path(tmp) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(item.data)
            path.chmod(item.mode)
            # A folder (wheels/) is copied whole by scp -r.
            top = Path(tmp) / Path(name).parts[0]
            if top not in paths:
                paths.append(top)
        steps = ("creating the install folder", "copying files", "running install.sh")
        for step, command in zip(steps, ssh_commands(host, paths, port, identity), strict=True):
            if on_step is not None:
                on_step(f"{host}: {step}")
            try:
                done = run(command)
            except FileNotFoundError:
                raise DeliveryError(f"{command[0]} is not installed on this machine") from None
            except subprocess.TimeoutExpired:
                raise DeliveryError(f"{step} on {host} timed out") from None
            if done.returncode != 0:
                output = (done.stderr or done.stdout or "").strip().splitlines()
                last = output[-1] if output else "no output"
                raise DeliveryError(f"{step} on {host} failed (exit {done.returncode}): {last}")
