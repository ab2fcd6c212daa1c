"""Sealed messages and who is believed: the envelope, the device registry, the verifiers, the
board's key file and `edgefl devices`. Pure: bytes, keys and SQLite, no broker."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefl import signing
from edgefl.cli import main
from edgefl.security.device_registry import DeviceRegistry
from edgefl.security.identity import AggregatorAuth, device_key
from edgefl.security.verifiers import INSECURE, STRICT, TOFU, DeviceVerifier, TrustedSigners
from edgefl.transport import topics
from edgefl.transport.sealed import (
    BAD_SIGNATURE,
    PREFIX_BYTES,
    UNKNOWN_DEVICE,
    SealError,
    raw_public_key,
    seal,
    strip_seal,
    unseal,
)

UPDATE_1 = topics.round_update("lab", 1, "pi-1")
UPDATE_2 = topics.round_update("lab", 2, "pi-1")
PAYLOAD = b'{"schema_version": 2, "device_id": "pi-1"}'


def test_a_seal_verifies_only_for_its_topic_and_exact_bytes() -> None:
    key = Ed25519PrivateKey.generate()
    data = seal(key, UPDATE_1, PAYLOAD)
    assert len(data) == PREFIX_BYTES + len(PAYLOAD) and data.endswith(PAYLOAD)
    sealed = unseal(data)
    assert sealed.public_key == raw_public_key(key)
    assert sealed.verify(UPDATE_1, key.public_key()) == PAYLOAD
    with pytest.raises(SealError, match="moved from another topic") as moved:
        sealed.verify(UPDATE_2, key.public_key())  # a replay in a later round
    assert moved.value.code == BAD_SIGNATURE
    altered = data[:-1] + b"!"
    with pytest.raises(SealError):
        unseal(altered).verify(UPDATE_1, key.public_key())
    with pytest.raises(SealError, match="not signed"):
        unseal(PAYLOAD)
    with pytest.raises(SealError, match="truncated"):
        unseal(data[:PREFIX_BYTES])
    assert seal(key, UPDATE_1, b"") == b""  # clearing a retained topic is never sealed
    assert strip_seal(data) == PAYLOAD and strip_seal(PAYLOAD) == PAYLOAD


def test_libsodium_and_openssl_agree_on_every_seal(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgefl.transport import sealed as sealed_module

    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    data = seal(key, UPDATE_1, PAYLOAD)
    verdicts = []
    for backend in (sealed_module._sodium_open, None):  # libsodium (host extra), then OpenSSL
        monkeypatch.setattr(sealed_module, "_sodium_open", backend)
        results = []
        for topic, trusted in ((UPDATE_1, key), (UPDATE_2, key), (UPDATE_1, other)):
            for form in (trusted.public_key(), raw_public_key(trusted)):
                try:
                    results.append(unseal(data).verify(topic, form) == PAYLOAD)
                except SealError:
                    results.append(False)
        verdicts.append(results)
    assert verdicts[0] == verdicts[1] == [True, True, False, False, False, False]


def _registry_with(tmp_path: Path, **keys: Ed25519PrivateKey) -> DeviceRegistry:
    registry = DeviceRegistry(tmp_path / "state.sqlite")
    for device, key in keys.items():
        registry.enroll(device.replace("_", "-"), raw_public_key(key))
    return registry


def test_strict_believes_only_the_enrolled_key_and_stops_at_revocation(tmp_path: Path) -> None:
    board, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    registry = _registry_with(tmp_path, pi_1=board)
    verifier = DeviceVerifier(registry, STRICT)
    assert verifier.open(UPDATE_1, "pi-1", seal(board, UPDATE_1, PAYLOAD)) == PAYLOAD
    with pytest.raises(SealError, match="enrolled with key") as forged:
        verifier.open(UPDATE_1, "pi-1", seal(stranger, UPDATE_1, PAYLOAD))
    assert forged.value.code == BAD_SIGNATURE
    with pytest.raises(SealError, match="not signed"):
        verifier.open(UPDATE_1, "pi-1", PAYLOAD)
    ghost = topics.round_update("lab", 1, "ghost")
    with pytest.raises(SealError, match="not enrolled") as unknown:
        verifier.open(ghost, "ghost", seal(stranger, ghost, PAYLOAD))
    assert unknown.value.code == UNKNOWN_DEVICE
    # Revoked from another process (the CLI): believed no more once the table is read again.
    DeviceRegistry(tmp_path / "state.sqlite").revoke("pi-1")
    verifier.refresh()
    with pytest.raises(SealError, match="revoked") as revoked:
        verifier.open(UPDATE_1, "pi-1", seal(board, UPDATE_1, PAYLOAD))
    assert revoked.value.code == UNKNOWN_DEVICE
    assert verifier.state("pi-1") == "revoked" and verifier.state("ghost") == "unknown"


def test_an_enrollment_made_while_running_is_seen_without_a_restart(tmp_path: Path) -> None:
    board = Ed25519PrivateKey.generate()
    verifier = DeviceVerifier(DeviceRegistry(tmp_path / "s.sqlite"), STRICT)
    with pytest.raises(SealError):
        verifier.open(UPDATE_1, "pi-1", seal(board, UPDATE_1, PAYLOAD))
    DeviceRegistry(tmp_path / "s.sqlite").enroll("pi-1", raw_public_key(board))
    verifier._refreshed = float("-inf")  # the refresh interval has passed
    assert verifier.open(UPDATE_1, "pi-1", seal(board, UPDATE_1, PAYLOAD)) == PAYLOAD


def test_tofu_pins_the_first_key_and_refuses_any_other_after(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    registry = DeviceRegistry(tmp_path / "s.sqlite")
    verifier = DeviceVerifier(registry, TOFU)
    with pytest.raises(SealError):  # a forged first message pins nothing
        verifier.open(UPDATE_1, "pi-1", seal(first, UPDATE_2, PAYLOAD))
    assert registry.get("pi-1") is None
    assert verifier.open(UPDATE_1, "pi-1", seal(first, UPDATE_1, PAYLOAD)) == PAYLOAD
    assert "trust on first use: pinned key" in caplog.text
    pinned = registry.get("pi-1")
    assert pinned is not None and pinned.state == "pinned"
    with pytest.raises(SealError, match="pinned with key"):
        verifier.open(UPDATE_1, "pi-1", seal(second, UPDATE_1, PAYLOAD))


def test_insecure_reads_sealed_and_plain_messages_alike() -> None:
    verifier = DeviceVerifier(None, INSECURE)
    key = Ed25519PrivateKey.generate()
    assert verifier.open(UPDATE_1, "pi-1", seal(key, UPDATE_1, PAYLOAD)) == PAYLOAD
    assert verifier.open(UPDATE_1, "pi-1", PAYLOAD) == PAYLOAD
    with pytest.raises(ValueError, match="needs a device registry"):
        DeviceVerifier(None, STRICT)


def test_a_board_believes_only_its_trusted_keys() -> None:
    aggregator, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    task = topics.round_task("lab", 3)
    trusted = TrustedSigners([aggregator.public_key()])
    assert trusted.open(task, seal(aggregator, task, PAYLOAD)) == PAYLOAD
    with pytest.raises(SealError, match="does not trust"):
        trusted.open(task, seal(stranger, task, PAYLOAD))
    with pytest.raises(SealError, match="not signed"):
        trusted.open(task, PAYLOAD)
    with pytest.raises(ValueError, match="no trusted key"):
        TrustedSigners([])


def test_aggregator_auth_counts_refusals_and_knows_its_own_seal() -> None:
    key = Ed25519PrivateKey.generate()
    auth = AggregatorAuth(key, DeviceVerifier(DeviceRegistry(), STRICT))
    task = topics.round_task("lab", 1)
    assert auth.sealed_by_me(task, auth.seal(task, PAYLOAD))
    assert not auth.sealed_by_me(task, seal(Ed25519PrivateKey.generate(), task, PAYLOAD))
    assert not auth.sealed_by_me(task, PAYLOAD)
    for _ in range(3):
        with pytest.raises(SealError):
            auth.open(UPDATE_1, "pi-1", PAYLOAD)
    assert auth.refused == {BAD_SIGNATURE: 3}


def test_a_board_makes_its_key_once_private_and_keeps_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key = device_key(state)
    private = state / "device.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    again = device_key(state)
    assert raw_public_key(again) == raw_public_key(key)  # the same key after a restart
    public = signing.load_public_key(state / "device.pub")
    assert raw_public_key(public) == raw_public_key(key)
    given = device_key(None, private)
    assert raw_public_key(given) == raw_public_key(key)
    with pytest.raises(ValueError, match="state_dir"):
        device_key(None)


def test_cli_devices_enroll_list_revoke(tmp_path: Path) -> None:
    state = tmp_path / "agg" / "state.sqlite"
    keys = signing.init_keys(tmp_path / "board", "device.key", "device.pub")
    runner = CliRunner()
    enrolled = runner.invoke(main, ["devices", "enroll", "pi-1", "--key", str(keys.public),
                                    "--state", str(state)])  # fmt: skip
    assert enrolled.exit_code == 0, enrolled.output
    key_id = signing.key_id(signing.load_public_key(keys.public))
    assert f"enrolled pi-1 with key {key_id}" in enrolled.output
    listed = runner.invoke(main, ["devices", "list", "--state", str(state)])
    assert listed.exit_code == 0 and f"pi-1\tenrolled\t{key_id}" in listed.output
    revoked = runner.invoke(main, ["devices", "revoke", "pi-1", "--state", str(state)])
    assert revoked.exit_code == 0 and "revoked pi-1" in revoked.output
    assert "pi-1\trevoked" in runner.invoke(main, ["devices", "list", "--state", str(state)]).output
    unknown = runner.invoke(main, ["devices", "revoke", "pi-9", "--state", str(state)])
    assert unknown.exit_code == 2 and "pi-9 is not in" in unknown.output
    bad_id = runner.invoke(main, ["devices", "enroll", "a/b", "--key", str(keys.public),
                                  "--state", str(state)])  # fmt: skip
    assert bad_id.exit_code == 2
    not_a_key = runner.invoke(main, ["devices", "enroll", "pi-2", "--key", str(state),
                                     "--state", str(state)])  # fmt: skip
    assert not_a_key.exit_code == 2 and "not a PEM public key" in not_a_key.output


def test_signing_is_on_unless_insecure_and_each_missing_piece_is_named(tmp_path: Path) -> None:
    runner = CliRunner(env={"HOME": str(tmp_path / "home")})  # no keys in the default place
    agent = ["agent", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--device-id", "pi",
             "--data", "digits", "--connect-timeout", "0.1"]  # fmt: skip
    no_trust = runner.invoke(main, agent)
    assert no_trust.exit_code == 2 and "no trusted key" in no_trust.output
    keys = signing.init_keys(tmp_path / "keys")
    no_state = runner.invoke(main, [*agent, "--trust-key", str(keys.public)])
    assert no_state.exit_code == 2 and "--state-dir" in no_state.output
    aggregate = ["aggregate", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--bundle", "b"]
    no_key = runner.invoke(main, aggregate)
    assert no_key.exit_code == 2 and "edgefl keys init" in no_key.output
    strict = runner.invoke(main, [*aggregate, "--signing-key", str(keys.private)])
    assert strict.exit_code == 2 and "--enrollment tofu" in strict.output
    # --insecure gets past all of that (to the broker, which is not there: exit 1), and says so.
    insecure = runner.invoke(main, [*agent, "--insecure"])
    assert insecure.exit_code == 1 and "runs --insecure" in insecure.output


def test_updates_carry_a_mac_under_the_key_one_board_shares_with_the_aggregator(
    tmp_path: Path,
) -> None:
    from edgefl.security.identity import AgentAuth

    fleet_key, board_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    registry = _registry_with(tmp_path, pi_1=board_key)
    aggregator = AggregatorAuth(fleet_key, DeviceVerifier(registry, STRICT))
    board = AgentAuth(board_key, TrustedSigners([fleet_key.public_key()]))
    # Each announces its X25519 key under its seal: the board in its status, the aggregator in
    # its task. Without the task's key a board seals its update (Ed25519) instead.
    assert board.seal_update(UPDATE_1, PAYLOAD, "")[:4] == b"EFS1"
    update = board.seal_update(UPDATE_1, PAYLOAD, aggregator.mac_public)
    assert update[:4] == b"EFM1" and update.endswith(PAYLOAD) and len(update) == 36 + len(PAYLOAD)
    with pytest.raises(SealError, match="no MAC key agreed"):  # no status of pi-1 seen yet
        aggregator.open(UPDATE_1, "pi-1", update)
    aggregator.learn_mac_key("pi-1", board.mac_public)
    assert aggregator.open(UPDATE_1, "pi-1", update) == PAYLOAD
    with pytest.raises(SealError, match="MAC does not match"):  # replayed in round 2
        aggregator.open(UPDATE_2, "pi-1", update)
    stranger = AgentAuth(Ed25519PrivateKey.generate(), TrustedSigners([fleet_key.public_key()]))
    with pytest.raises(SealError, match="MAC does not match"):  # a key it does not share
        aggregator.open(UPDATE_1, "pi-1", stranger.seal_update(UPDATE_1, PAYLOAD,
                                                               aggregator.mac_public))  # fmt: skip
    registry.revoke("pi-1")
    aggregator.devices.refresh()
    with pytest.raises(SealError, match="revoked"):
        aggregator.open(UPDATE_1, "pi-1", update)
    assert aggregator.refused == {"bad-signature": 3, "unknown-device": 1}
