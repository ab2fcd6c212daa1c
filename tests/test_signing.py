"""Signing keys and signatures: key files, refusal to overwrite, tamper detection, `keys init`."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgefl import signing
from edgefl.cli import main
from edgefl.errors import KeyFileError, MessageError, SignatureError


def test_init_keys_writes_private_key_with_mode_0600(tmp_path: Path) -> None:
    paths = signing.init_keys(tmp_path / "keys")
    assert stat.S_IMODE(paths.private.stat().st_mode) == 0o600
    assert paths.public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    private = signing.load_private_key(paths.private)
    public = signing.load_public_key(paths.public)
    assert signing.key_id(private.public_key()) == signing.key_id(public)


def test_init_keys_refuses_to_overwrite(tmp_path: Path) -> None:
    paths = signing.init_keys(tmp_path)
    before = paths.private.read_bytes()
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        signing.init_keys(tmp_path)
    assert paths.private.read_bytes() == before


def test_wrong_key_and_missing_signature_are_refused(tmp_path: Path) -> None:
    ours = signing.load_private_key(signing.init_keys(tmp_path / "a").private)
    theirs = signing.load_public_key(signing.init_keys(tmp_path / "b").public)
    signature = signing.sign(ours, b"payload")
    with pytest.raises(SignatureError, match="not signed by trusted key"):
        signing.verify(theirs, b"payload", signature)
    with pytest.raises(SignatureError, match="not signed"):
        signing.verify(ours.public_key(), b"payload", "")
    with pytest.raises(SignatureError, match="base64"):
        signing.verify(ours.public_key(), b"payload", "***")


def test_loading_bad_key_files_names_the_problem(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="not found"):
        signing.load_private_key(tmp_path / "missing.key")
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        signing.load_public_key(junk)
    paths = signing.init_keys(tmp_path / "k")
    with pytest.raises(KeyFileError, match="not a PEM private key"):
        signing.load_private_key(paths.public)


def test_cli_keys_init_then_refuses_second_time(tmp_path: Path) -> None:
    runner = CliRunner()
    first = runner.invoke(main, ["keys", "init", "--dir", str(tmp_path / "keys")])
    assert first.exit_code == 0, first.output
    assert "key id" in first.output
    assert (tmp_path / "keys" / "signing.key").is_file()
    second = runner.invoke(main, ["keys", "init", "--dir", str(tmp_path / "keys")])
    assert second.exit_code == 2
    assert "already exists" in second.output


def test_an_envelope_verifies_its_exact_bytes_and_names_bad_fields(tmp_path: Path) -> None:
    paths = signing.init_keys(tmp_path)
    key = signing.load_private_key(paths.private)
    signed = '{"group": "Küche", "x": 1.0}'.encode()
    wire = signing.seal(key, signed).to_bytes()
    envelope = signing.Envelope.from_bytes(wire)
    assert envelope.verify(signing.load_public_key(paths.public)) == signed
    assert envelope.key_id == signing.key_id(key.public_key())
    altered = signing.Envelope(signed.replace(b"1.0", b"1"), envelope.signature, envelope.key_id)
    with pytest.raises(SignatureError, match="does not match"):
        altered.verify(signing.load_public_key(paths.public))
    assert altered.digest != envelope.digest
    for payload, words in [
        (b"[]", "not a JSON object"),
        (b'{"signed": 5, "signature": ""}', "'signed' must be a string, not int"),
        (b'{"signed": "!!", "signature": ""}', "'signed' is not base64"),
        (b'{"signed": "", "signature": "", "key_id": []}', "'key_id' must be a string"),
    ]:
        with pytest.raises(MessageError, match=words):
            signing.Envelope.from_bytes(payload, "release")
