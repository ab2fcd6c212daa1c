"""`edgefl flash`: board files filled in, the offline tarball, the exact ssh/scp command lines and
the one-line error when ssh cannot reach the board."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import free_port

from edgefl import signing
from edgefl.cli import main
from edgefl.delivery import flash
from edgefl.delivery.install_script import render_install_script
from edgefl.errors import BrokerUrlError, DeliveryError, ProfileError
from edgefl.profiles import available_profiles, load_profile
from edgefl.transport.tls import TlsSettings

TLS_ARGS = (
    "--cafile /etc/edgefl/tls/ca.crt --cert /etc/edgefl/tls/device.crt"
    " --key /etc/edgefl/tls/device.key"
)


@pytest.fixture
def public_key(tmp_path: Path) -> Path:
    return signing.init_keys(tmp_path / "keys").public


@pytest.fixture
def board_tls(tmp_path: Path) -> TlsSettings:
    """A board's CA, certificate and key files (flash copies them as they are)."""
    folder = tmp_path / "pki"
    folder.mkdir()
    for name in ("ca.crt", "pi-01.crt", "pi-01.key"):
        (folder / name).write_text(f"-----BEGIN {name}-----\n")
    return TlsSettings(str(folder / "ca.crt"), str(folder / "pi-01.crt"), str(folder / "pi-01.key"))


def agent_argv(unit: str, env: str) -> list[str]:
    """The agent's command line as systemd builds it from ExecStart and the EnvironmentFile:
    `${VAR}` is one word (even when empty), `$VAR` is split on spaces (no word when empty)."""
    values = dict(
        line.split("=", 1) for line in env.splitlines() if "=" in line and not line.startswith("#")
    )
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv: list[str] = []
    for word in exec_start.removeprefix("ExecStart=").split():
        if word.startswith("${"):
            argv.append(values.get(word[2:-1], ""))
        elif word.startswith("$"):
            argv += values.get(word[1:], "").split()
        else:
            argv.append(word)
    return argv


def test_shipped_profiles_prefer_their_artifacts() -> None:
    assert {"raspberry-pi", "jetson"} <= set(available_profiles())
    pi = load_profile("raspberry-pi")
    assert pi.prefer[:2] == [("tflite", "int8"), ("onnx", "int8")]
    jetson = load_profile("jetson")
    assert jetson.prefer[0] == ("onnx", "fp16")
    assert "onnxruntime-gpu" in jetson.install.packages
    assert jetson.providers == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider",
    ]  # fmt: skip
    assert pi.providers == ["CPUExecutionProvider"]
    with pytest.raises(DeliveryError, match="unknown device profile 'toaster'"):
        load_profile("toaster")


@pytest.mark.parametrize("board", ["raspberry-pi", "jetson"])
def test_board_files_are_valid(board: str, tmp_path: Path) -> None:
    profile = load_profile(board)
    script = profile.file("install.sh")
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    text = script.read_text()
    assert "edgefl[agent]" in text and "torch" in text  # installs the agent, warns on torch
    for package in profile.install.packages:
        assert package in text
    unit = profile.file("edgefl-agent.service").read_text()
    assert "Restart=always" in unit and "edgefl agent" in unit
    assert (profile.directory / "Dockerfile").is_file() == (board == "jetson")
    if board == "jetson":
        dockerfile = (profile.directory / "Dockerfile").read_text()
        # NVIDIA's base image and index are build arguments: no registry host is shipped.
        assert "FROM ${L4T_IMAGE}" in dockerfile and "--extra-index-url" in dockerfile
        # The container installs what install.sh does: the profile's [install] table.
        spec = profile.install
        for value in (*spec.packages, *spec.uninstall, *spec.extra_index_urls, *spec.apt):
            assert value in dockerfile


@pytest.mark.parametrize("board", ["raspberry-pi", "jetson"])
def test_shipped_install_scripts_are_the_template_filled_in(board: str) -> None:
    profile = load_profile(board)
    committed = profile.file("install.sh").read_text()
    assert committed == render_install_script(profile), (
        f"devices/{board}/install.sh differs from devices/install.sh.template filled in from its"
        " profile; run `python -m edgefl.delivery.install_script`"
    )


def test_a_profile_without_install_sh_gets_one_from_the_template(
    tmp_path: Path, public_key: Path
) -> None:
    board = tmp_path / "my-board"
    board.mkdir()
    (board / "profile.toml").write_text(
        'name = "my-board"\ndescription = "a board of my own"\n[install]\n'
        'uninstall = ["onnxruntime"]\npackages = ["onnxruntime-openvino>=1.20"]\n'
        'extra_index_urls = ["https://a.example/simple", "https://b.example/simple"]\n'
        'apt = ["python3-venv"]\n'
    )
    shipped = load_profile("raspberry-pi")
    for name in ("agent.env", "edgefl-agent.service"):
        (board / name).write_bytes(shipped.file(name).read_bytes())
    settings = flash.BoardSettings("mqtt://b:1883", "lab", "mine-1")
    files = flash.build_install_files(load_profile(board), settings, public_key)
    script = files["install.sh"]
    assert script.mode == 0o755
    text = script.data.decode()
    assert "apt-get install -y -qq python3-venv\n" in text
    assert (
        'EXTRA_INDEX_URLS="${EDGEFL_EXTRA_INDEX_URLS:-https://a.example/simple'
        ' https://b.example/simple}"\n'
        'if [ -n "$EXTRA_INDEX_URLS" ] || [ -d "$HERE/wheels" ]; then\n'
        '    "${PIP[@]}" uninstall --quiet --yes onnxruntime\n'
        '    PIP_EXTRA_INDEX_URL="$EXTRA_INDEX_URLS" "${PIP_INSTALL[@]}"'
        " 'onnxruntime-openvino>=1.20'\n"
    ) in text
    assert "@" not in text.replace("edgefl-*.whl", "").replace("[@]", "")
    checked = tmp_path / "install.sh"
    checked.write_bytes(script.data)
    assert subprocess.run(["bash", "-n", str(checked)], check=False).returncode == 0
    (board / "install.sh").write_text("#!/bin/sh\necho mine\n")  # a profile's own script wins
    files = flash.build_install_files(load_profile(board), settings, public_key)
    assert files["install.sh"].data == b"#!/bin/sh\necho mine\n"


def test_render_agent_env_replaces_values_and_keeps_comments() -> None:
    template = "# broker\nEDGEFL_BROKER=mqtt://x\nEDGEFL_FLEET=lab\n"
    text = flash.render_agent_env(template, {"EDGEFL_FLEET": "home", "EDGEFL_NEW": "1"})
    assert text == "# broker\nEDGEFL_BROKER=mqtt://x\nEDGEFL_FLEET=home\nEDGEFL_NEW=1\n"


def test_ssh_command_lines() -> None:
    files = [Path("/tmp/a/install.sh"), Path("/tmp/a/agent.env")]
    commands = flash.ssh_commands("pi@board", files, port=2222, identity=Path("/k/id"))
    options = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    assert commands == [
        ["ssh", *options, "-p", "2222", "-i", "/k/id", "pi@board",
         "rm -rf edgefl-install && mkdir -p edgefl-install"],
        ["scp", "-q", "-r", *options, "-P", "2222", "-i", "/k/id", "/tmp/a/install.sh",
         "/tmp/a/agent.env", "pi@board:edgefl-install/"],
        ["ssh", *options, "-p", "2222", "-i", "/k/id", "pi@board",
         "cd edgefl-install && sudo ./install.sh"],
    ]  # fmt: skip


def test_flash_runs_the_three_steps_and_stops_at_the_first_failure(public_key: Path) -> None:
    settings = flash.BoardSettings("mqtt://b:1883", "lab", "pi-7")
    files = flash.build_install_files(load_profile("raspberry-pi"), settings, public_key)
    ran: list[list[str]] = []

    def run(command: list[str]) -> subprocess.CompletedProcess[str]:
        ran.append(command)
        code = 1 if command[0] == "scp" else 0
        return subprocess.CompletedProcess(command, code, "", "scp: disk full\n")

    with pytest.raises(DeliveryError, match=r"copying files on pi@b failed \(exit 1\): scp: disk"):
        flash.flash_over_ssh("pi@b", files, run=run)
    assert [c[0] for c in ran] == ["ssh", "scp"]


def test_cli_offline_tarball(tmp_path: Path, public_key: Path) -> None:
    out = tmp_path / "agent.tar.gz"
    result = CliRunner().invoke(
        main,
        ["flash", "--profile", "raspberry-pi", "--output", str(out), "--trust-key",
         str(public_key), "--broker", "mqtt://10.0.0.5:1884", "--fleet", "home",
         "--device-id", "pi-kitchen", "--group", "kitchen"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with tarfile.open(out) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "x", filter="data")
    root = tmp_path / "x" / "edgefl-agent"
    assert {"install.sh", "edgefl-agent.service", "agent.env", "signing.pub", "INSTALL.md"} <= {
        Path(n).name for n in names
    }
    assert any(Path(n).name.startswith("edgefl-") and n.endswith(".whl") for n in names)
    assert (root / "install.sh").stat().st_mode & 0o111
    assert subprocess.run(["bash", "-n", str(root / "install.sh")], check=False).returncode == 0
    env = (root / "agent.env").read_text()
    for line in ("EDGEFL_BROKER=mqtt://10.0.0.5:1884", "EDGEFL_FLEET=home",
                 "EDGEFL_DEVICE_ID=pi-kitchen", "EDGEFL_AGENT_ARGS=--group kitchen"):  # fmt: skip
        assert line in env.splitlines()
    assert (root / "signing.pub").read_bytes() == public_key.read_bytes()
    assert "sudo ./install.sh" in (root / "INSTALL.md").read_text()
    # Without TLS options: no TLS file, and the agent gets no TLS flag and no empty argument.
    assert not {"ca.crt", "device.crt", "device.key"} & {Path(n).name for n in names}
    assert "EDGEFL_TLS_ARGS=" in env.splitlines()
    argv = agent_argv((root / "edgefl-agent.service").read_text(), env)
    assert "" not in argv and not {"--cafile", "--cert", "--key"} & set(argv)
    assert argv[-2:] == ["--group", "kitchen"]
    if shutil.which("systemd-analyze"):
        # The unit names /opt/edgefl/venv/bin/edgefl, which exists only on a board.
        unit = (root / "edgefl-agent.service").read_text()
        checked = tmp_path / "edgefl-agent.service"
        checked.write_text(unit.replace("/opt/edgefl/venv/bin/edgefl", sys.executable))
        verify = subprocess.run(
            ["systemd-analyze", "verify", str(checked)], capture_output=True, text=True
        )
        assert verify.returncode == 0, verify.stderr


def test_cli_ssh_failure_is_one_line(tmp_path: Path, public_key: Path) -> None:
    if shutil.which("ssh") is None:
        pytest.skip("no ssh client on this machine")
    result = CliRunner().invoke(
        main,
        ["flash", "--profile", "raspberry-pi", "--host", "pi@127.0.0.1", "--port",
         str(free_port()), "--trust-key", str(public_key), "--no-wheel"],
    )  # fmt: skip
    assert result.exit_code == 1  # the world failed: ssh could not connect
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1
    assert "creating the install folder on pi@127.0.0.1 failed (exit 255)" in error[0]


def test_cli_flash_input_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    both = runner.invoke(main, ["flash", "--profile", "jetson"])
    assert both.exit_code == 2 and "either --host" in both.output
    missing_key = runner.invoke(
        main, ["flash", "--profile", "jetson", "--output", str(tmp_path / "a.tgz"),
               "--trust-key", str(tmp_path / "none.pub"), "--no-wheel"],
    )  # fmt: skip
    assert missing_key.exit_code == 2 and "edgefl keys init" in missing_key.output
    assert not (tmp_path / "a.tgz").exists()


def test_cli_flash_profile_without_agent_env_is_one_line(tmp_path: Path) -> None:
    profile = tmp_path / "bare"
    profile.mkdir()
    (profile / "profile.toml").write_text('name = "bare"\n')
    args = ["flash", "--profile", str(profile), "--output", str(tmp_path / "a.tgz"), "--no-wheel"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert f"profile bare has no agent.env in {profile}" in result.output
    assert not (tmp_path / "a.tgz").exists()


def test_a_profile_key_typo_is_an_error_naming_the_key_and_file(tmp_path: Path) -> None:
    shipped = load_profile("raspberry-pi").directory / "profile.toml"
    board = tmp_path / "my-board"
    board.mkdir()
    (board / "profile.toml").write_text(shipped.read_text().replace("threads =", "thread ="))
    with pytest.raises(DeliveryError, match=r"my-board/profile.toml: unknown key 'thread'"):
        load_profile(board)
    (board / "profile.toml").write_text(
        shipped.read_text().replace('providers = ["CPUExecutionProvider"]', 'providers = "CPU"')
    )
    with pytest.raises(DeliveryError, match=r"providers must be a list of provider names"):
        load_profile(board)


def test_cli_tarball_ships_the_board_tls_files_and_the_agent_uses_them(
    tmp_path: Path, public_key: Path, board_tls: TlsSettings
) -> None:
    out = tmp_path / "agent.tar.gz"
    result = CliRunner().invoke(
        main,
        ["flash", "--profile", "raspberry-pi", "--output", str(out), "--trust-key",
         str(public_key), "--broker", "mqtts://broker.lan:8883", "--device-id", "pi-01",
         "--group", "kitchen", "--no-wheel", "--cafile", str(board_tls.cafile),
         "--cert", str(board_tls.certfile), "--key", str(board_tls.keyfile)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with tarfile.open(out) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers()}
        tar.extractall(tmp_path / "x", filter="data")
    root = tmp_path / "x" / "edgefl-agent"
    for name, source, mode in (("ca.crt", board_tls.cafile, 0o644),
                               ("device.crt", board_tls.certfile, 0o644),
                               ("device.key", board_tls.keyfile, 0o600)):  # fmt: skip
        assert members[name].mode == mode, name
        assert (root / name).read_bytes() == Path(str(source)).read_bytes()
    env = (root / "agent.env").read_text()
    assert f"EDGEFL_TLS_ARGS={TLS_ARGS}" in env.splitlines()
    argv = agent_argv((root / "edgefl-agent.service").read_text(), env)
    assert argv[0] == "/opt/edgefl/venv/bin/edgefl" and argv[1] == "agent"
    assert argv[argv.index("--broker") + 1] == "mqtts://broker.lan:8883"
    assert argv[-8:] == ["--group", "kitchen", *TLS_ARGS.split()]
    # The agent takes those flags.
    agent_flags = {opt for param in main.commands["agent"].params for opt in param.opts}
    assert {"--cafile", "--cert", "--key"} <= agent_flags
    guide = (root / "INSTALL.md").read_text()
    assert "/etc/edgefl/tls/" in guide and "ca.crt, device.crt, device.key" in guide


@pytest.mark.parametrize("board", ["raspberry-pi", "jetson"])
def test_install_sh_puts_the_tls_files_in_place(
    board: str, tmp_path: Path, public_key: Path, board_tls: TlsSettings
) -> None:
    user = pwd.getpwuid(os.getuid()).pw_name
    try:
        grp.getgrnam(user)
    except KeyError:
        pytest.skip(f"no group named {user}: install.sh gives the key to user and group edgefl")
    settings = flash.BoardSettings("mqtts://b:8883", "lab", "pi-01", tls=board_tls)
    files = flash.build_install_files(load_profile(board), settings, public_key)
    script = files["install.sh"].data.decode()
    # Run install.sh's TLS step alone: from its comment up to the unit's installation.
    start = script.index("# TLS files for an mqtts:// broker")
    step = script[start : script.index('install -m 0644 "$HERE/edgefl-agent.service"')]

    def run_step(names: list[str]) -> Path:
        here, config = tmp_path / f"here-{len(names)}", tmp_path / f"etc-{len(names)}"
        here.mkdir()
        for name in names:
            (here / name).write_bytes(files[name].data)
        prelude = f"set -euo pipefail\nHERE={here}\nCONFIG_DIR={config}\nSERVICE_USER={user}\n"
        done = subprocess.run(["bash", "-c", prelude + step], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return config / "tls"

    tls_dir = run_step(["ca.crt", "device.crt", "device.key"])
    modes = {p.name: p.stat().st_mode & 0o777 for p in tls_dir.iterdir()}
    assert modes == {"ca.crt": 0o644, "device.crt": 0o644, "device.key": 0o600}
    assert (tls_dir / "device.key").stat().st_uid == os.getuid()
    assert (tls_dir / "device.key").read_bytes() == Path(str(board_tls.keyfile)).read_bytes()
    assert [p.name for p in run_step(["ca.crt"]).iterdir()] == ["ca.crt"]
    assert not run_step([]).exists()


def test_flash_over_ssh_copies_the_tls_files_with_their_modes(
    public_key: Path, board_tls: TlsSettings
) -> None:
    settings = flash.BoardSettings("mqtts://b:8883", "lab", "pi-7", tls=board_tls)
    files = flash.build_install_files(load_profile("raspberry-pi"), settings, public_key)
    copied: dict[str, int] = {}

    def run(command: list[str]) -> subprocess.CompletedProcess[str]:
        if command[0] == "scp":
            sources = [Path(word) for word in command if word.startswith("/")]
            copied.update({p.name: p.stat().st_mode & 0o777 for p in sources})
        return subprocess.CompletedProcess(command, 0, "", "")

    flash.flash_over_ssh("pi@b", files, run=run)
    assert {k: copied[k] for k in ("ca.crt", "device.crt", "device.key", "agent.env")} == {
        "ca.crt": 0o644, "device.crt": 0o644, "device.key": 0o600, "agent.env": 0o600,
    }  # fmt: skip


def test_cli_flash_refuses_unusable_tls_options(tmp_path: Path, board_tls: TlsSettings) -> None:
    out = tmp_path / "a.tgz"
    base = ["flash", "--profile", "raspberry-pi", "--output", str(out), "--no-wheel"]
    runner = CliRunner()
    key_alone = runner.invoke(
        main, [*base, "--broker", "mqtts://b:8883", "--key", str(board_tls.keyfile)]
    )
    assert key_alone.exit_code == 2, key_alone.output
    assert "--cert and its key must be given together" in key_alone.output
    plain = runner.invoke(main, [*base, "--broker", "mqtt://b:1883", "--cafile", board_tls.cafile])
    assert plain.exit_code == 2, plain.output
    assert "need an mqtts:// broker URL, not mqtt://b:1883" in plain.output
    assert not out.exists()


def test_build_install_files_refuses_tls_it_cannot_honour(
    tmp_path: Path, public_key: Path, board_tls: TlsSettings
) -> None:
    profile = load_profile("raspberry-pi")
    plain = flash.BoardSettings("mqtt://b:1883", "lab", "pi-1", tls=board_tls)
    with pytest.raises(BrokerUrlError, match="need an mqtts:// broker URL"):
        flash.build_install_files(profile, plain, public_key)
    cert_only = TlsSettings(certfile=board_tls.certfile)
    with pytest.raises(BrokerUrlError, match="`keyfile` must be given with `certfile`"):
        flash.build_install_files(
            profile, flash.BoardSettings("mqtts://b", "lab", "pi-1", tls=cert_only), public_key
        )
    # A profile of the user's own whose unit ignores EDGEFL_TLS_ARGS would drop the files silently.
    board = tmp_path / "old-board"
    board.mkdir()
    (board / "profile.toml").write_text('name = "old-board"\n')
    (board / "agent.env").write_bytes(profile.file("agent.env").read_bytes())
    unit = profile.file("edgefl-agent.service").read_text()
    (board / "edgefl-agent.service").write_text(unit.replace(" $EDGEFL_TLS_ARGS", ""))
    tls = flash.BoardSettings("mqtts://b", "lab", "pi-1", tls=board_tls)
    with pytest.raises(ProfileError, match=r"does not pass \$EDGEFL_TLS_ARGS"):
        flash.build_install_files(load_profile(board), tls, public_key)
    bare = flash.BoardSettings("mqtt://b", "lab", "pi-1")
    files = flash.build_install_files(load_profile(board), bare, public_key)
    assert "ca.crt" not in files  # without TLS that profile works as before


@pytest.mark.parametrize("board", ["raspberry-pi", "jetson"])
def test_the_unit_runs_confined_as_its_own_user_and_writes_only_its_paths(board: str) -> None:
    profile = load_profile(board)
    unit = profile.file("edgefl-agent.service").read_text().splitlines()
    for line in ("User=edgefl", "Group=edgefl", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ProtectHome=yes", "PrivateTmp=yes", "UMask=0077"):  # fmt: skip
        assert line in unit
    (writable,) = [line for line in unit if line.startswith("ReadWritePaths=")]
    env = dict(
        line.split("=", 1)
        for line in profile.file("agent.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    # What the agent writes (its state and installed models) and nothing more.
    assert writable.removeprefix("ReadWritePaths=").split() == [
        env["EDGEFL_STATE_DIR"], env["EDGEFL_MODELS_DIR"],
    ]  # fmt: skip


@pytest.mark.parametrize("board", ["raspberry-pi", "jetson"])
def test_install_sh_keeps_agent_env_and_the_agent_state_private(
    board: str, tmp_path: Path, public_key: Path
) -> None:
    user = pwd.getpwuid(os.getuid()).pw_name
    try:
        grp.getgrnam(user)
    except KeyError:
        pytest.skip(f"no group named {user}: install.sh gives the state to user and group edgefl")
    settings = flash.BoardSettings("mqtt://user:secret@b:1883", "lab", "pi-01")
    files = flash.build_install_files(load_profile(board), settings, public_key)
    assert files["agent.env"].mode == 0o600
    script = files["install.sh"].data.decode()
    # install.sh's directory step and its agent.env step, run alone under tmp_path.
    dirs = script[script.index("# The agent's state") : script.index("PIP=(")]
    env_step = script[script.index('if [ -f "$HERE/agent.env" ]') : script.index("# TLS files")]
    here, config, state = tmp_path / "here", tmp_path / "etc", tmp_path / "var"
    here.mkdir()
    (here / "agent.env").write_bytes(files["agent.env"].data)
    config.mkdir()
    (config / "agent.env").write_text("EDGEFL_BROKER=mqtt://old\n")  # an older install's, 0644
    (config / "agent.env").chmod(0o644)
    state.mkdir(mode=0o755)
    prelude = (
        f"set -euo pipefail\nHERE={here}\nCONFIG_DIR={config}\nSTATE_DIR={state}\n"
        f"PREFIX={tmp_path / 'opt'}\nSERVICE_USER={user}\n"
    )
    done = subprocess.run(["bash", "-c", prelude + dirs + env_step], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    modes = {p.name: p.stat().st_mode & 0o777 for p in config.iterdir()}
    assert modes == {"agent.env": 0o600, "agent.env.bak": 0o600}
    assert "user:secret" in (config / "agent.env").read_text()
    for path in (state, state / "state", state / "models", state / "data"):
        assert path.stat().st_mode & 0o777 == 0o700, path


def test_flash_makes_the_board_key_records_it_and_install_sh_keeps_an_existing_one(
    tmp_path: Path, public_key: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgefl import signing
    from edgefl.security.device_registry import DeviceRegistry
    from edgefl.transport.sealed import raw_public_key

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    out, state = tmp_path / "agent.tar.gz", tmp_path / "agg" / "state.sqlite"
    result = CliRunner().invoke(
        main,
        ["flash", "--profile", "raspberry-pi", "--output", str(out), "--trust-key",
         str(public_key), "--fleet", "home", "--device-id", "pi-7", "--no-wheel",
         "--enroll", str(state)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with tarfile.open(out) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    root = tmp_path / "x" / "edgefl-agent"
    shipped = signing.load_private_key(root / "board-signing.key")
    assert (root / "board-signing.key").stat().st_mode & 0o777 == 0o600
    recorded = tmp_path / "home" / ".config" / "edgefl" / "devices" / "home" / "pi-7.pub"
    assert raw_public_key(signing.load_public_key(recorded)) == raw_public_key(shipped)
    assert f"public half in {recorded}" in result.output and "enrolled pi-7" in result.output
    entry = DeviceRegistry(state).get("pi-7")
    assert entry is not None and entry.public_key == raw_public_key(shipped)
    # install.sh's key step: installs the key on a fresh board, keeps the key of a board that
    # has one (its identity), and says which to enroll.
    user = pwd.getpwuid(os.getuid()).pw_name
    try:
        grp.getgrnam(user)
    except KeyError:
        pytest.skip(f"no group named {user}: install.sh gives the key to user and group edgefl")
    script = (root / "install.sh").read_text()
    step = script[script.index("# The board's signing key") :]
    step = step[: step.index("\nfi\n", step.index("else")) + 4]
    board = tmp_path / "board"
    (board / "state").mkdir(parents=True)
    prelude = f"set -euo pipefail\nHERE={root}\nSTATE_DIR={board}\nSERVICE_USER={user}\n"
    for _ in range(2):
        done = subprocess.run(["bash", "-c", prelude + step], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert (board / "state" / "device.key").read_bytes() == (
        root / "board-signing.key"
    ).read_bytes()
    assert (board / "state" / "device.key").stat().st_mode & 0o777 == 0o600
    assert "keeping this board's signing key" in done.stderr  # the second run
    no_key = CliRunner().invoke(
        main,
        ["flash", "--profile", "raspberry-pi", "--output", str(tmp_path / "b.tar.gz"),
         "--trust-key", str(public_key), "--no-wheel", "--no-board-key"],
    )  # fmt: skip
    assert no_key.exit_code == 0 and "board key" not in no_key.output
