"""How a client proves who it is and whom it trusts over `mqtts://`: CA file, certificate, key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
            other = "certfile" if self.keyfile else "keyfile"
            raise ValueError(f"`{missing}` must be given with `{other}`: they are a pair")
        for name in ("cafile", "certfile", "keyfile"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"`{name}` {path} is not a file")
