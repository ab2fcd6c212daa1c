"""How a client proves who it is and whom it trusts over `mqtts://`: CA file, certificate, key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgefl.errors import BrokerUrlError
from edgefl.transport.broker import BrokerAddress


@dataclass(frozen=True)
class TlsSettings:
    """The TLS files of a broker connection, named as `mosquitto_pub` names them.

    Attributes:
        cafile: the CA bundle that signed the broker's certificate (None: the system CAs).
        certfile: this client's certificate (PEM), for brokers that require one (mTLS).
        keyfile: the private key of `certfile` (PEM).
    """

    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None

    @property
    def given(self) -> bool:
        """Whether any file is set (a plain `mqtt://` URL then is a mistake)."""
        return any((self.cafile, self.certfile, self.keyfile))

    def check(self) -> None:
        """Raise ValueError naming (in backquotes) the first unusable setting: a certificate
        without its key (or the reverse), or a file that does not exist."""
        if bool(self.certfile) != bool(self.keyfile):
            missing = "keyfile" if self.certfile else "certfile"
            other = "certfile" if self.certfile else "keyfile"
            raise ValueError(f"`{missing}` must be given with `{other}`: they are a pair")
        for name in ("cafile", "certfile", "keyfile"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"`{name}` {path} is not a file")


def check_tls(address: BrokerAddress, tls: TlsSettings) -> None:
    """Refuse TLS files with a plain `mqtt://` URL, and unusable files.

    Raises:
        BrokerUrlError: the combination is the caller's mistake (exit 2).
    """
    if tls.given and not address.tls:
        raise BrokerUrlError(
            f"`cafile`, `certfile` and `keyfile` need an mqtts:// broker URL, not {address.url}"
        )
    try:
        tls.check()
    except ValueError as exc:
        raise BrokerUrlError(str(exc)) from None


def is_login_refusal(reason: str) -> bool:
    """Whether a CONNACK reason means the credentials were refused (not a passing failure)."""
    text = reason.lower()
    return "not authori" in text or "bad user name or password" in text


def describe_refusal(reason: str) -> str:
    """Say why the broker refused a CONNECT, in the words a user searches for."""
    if is_login_refusal(reason):
        return f"not authorized: the broker refused the login ({reason})"
    return f"broker refused the connection: {reason}"


def describe_tls_error(text: str) -> str:
    """Say which side of a TLS handshake failed: the broker refusing this client's certificate
    is reported as "not authorized"; anything else as a TLS handshake failure."""
    lowered = text.lower()
    client_side = ("certificate required", "unknown ca", "bad certificate", "certificate unknown")
    if any(marker in lowered for marker in client_side):
        return f"not authorized: the broker refused the client certificate (TLS: {text})"
    return f"TLS handshake failed: {text}"
