"""How a device agent runs (`AgentConfig`): broker, identity, data, bundle, and the board's own
round settings (privacy bounds, forced codec, personalization, training backend, limits)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgefl.core.board_limits import BoardLimits
from edgefl.core.codecs import CODEC_NAMES
from edgefl.core.local_round import BoardSettings
from edgefl.core.settings import PrivacySettings
from edgefl.roles.features import RUNTIME_FORMATS
from edgefl.security.identity import AgentAuth
from edgefl.transport import topics
from edgefl.transport.tls import TlsSettings


@dataclass
class AgentConfig:
    """How a device agent runs.

    Attributes:
        broker_url: `mqtt://host[:port]` or `mqtts://...`.
        fleet: the fleet name (a topic level).
        device_id: this device's ID, unique in the fleet (a topic level).
        data: local data: "digits", a `.npz` or an ImageFolder directory; None when a dataset
            is passed to `Agent` directly.
        bundle_dir: the bundle to run; None waits for one to be installed (delivery).
        state_dir: feature cache and personal heads; None keeps them in memory.
        task: which head of the bundle this device trains.
        runtime: "auto", "onnx" or "tflite": which backbone artifact to run; "auto" follows the
            board profile's preference, else ONNX before TFLite.
        threads: runtime threads for feature extraction; None takes the profile's, else 1.
        heartbeat_s: seconds between status refreshes.
        codec: force an update codec; None follows the round's task.
        personalize: keep a personal head (the global head fine-tuned locally) for inference.
        train_backend: "auto", "numpy" or "torch" (see edgefl.core.training).
        connect_timeout_s: how long start() waits for the broker; None does not wait.
        privacy: this board's own privacy bounds: the smaller clip norm and the larger noise
            multiplier of the board's and the round's apply. A noise multiplier without a clip
            norm of the board's own is scaled by the round's (a round without one then fails).
        group: the device's group in the fleet (`edgefl deploy --group`), announced in its status.
        profile: the board profile, a name from `devices/` or a profile.toml path: which backbone
            artifact it prefers, how many threads it runs and its `[limits]`; announced in its
            status.
        limits: the most a round may ask of this board (epochs, batch size, learning rate, a
            time budget per round; beyond them a task is clamped, see edgefl.core.board_limits);
            None takes the profile's `[limits]`, else the defaults.
        tls: the CA file and client certificate for an `mqtts://` broker.
        auth: the board's key (seals its statuses, updates and deploy reports) and the keys
            whose tasks and results it believes (`edgefl.security.identity.AgentAuth`); None
            runs insecure (logged).
    """

    broker_url: str
    fleet: str
    device_id: str
    data: str | None = None
    bundle_dir: Path | None = None
    state_dir: Path | None = None
    task: str = "default"
    runtime: str = "auto"
    threads: int | None = None
    heartbeat_s: float = 30.0
    codec: str | None = None
    personalize: bool = True
    train_backend: str = "auto"
    connect_timeout_s: float | None = 30.0
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    group: str = ""
    profile: str = ""
    limits: BoardLimits | None = None
    tls: TlsSettings = field(default_factory=TlsSettings)
    auth: AgentAuth | None = None

    def check(self) -> None:
        """Raise ValueError naming the first invalid setting."""
        topics.check_name(self.fleet, "fleet")
        topics.check_name(self.device_id, "device ID")
        topics.check_name(self.task, "task")
        if self.runtime != "auto" and self.runtime not in RUNTIME_FORMATS:
            raise ValueError(f"runtime must be auto, onnx or tflite, not {self.runtime!r}")
        if self.codec is not None and self.codec not in CODEC_NAMES:
            raise ValueError(f"codec must be one of {', '.join(CODEC_NAMES)}, not {self.codec!r}")
        if self.heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be positive")
        if self.privacy.clip_norm is not None and not self.privacy.clip_norm > 0:
            raise ValueError("clip_norm must be positive")
        if not self.privacy.noise_multiplier >= 0:
            raise ValueError("noise_multiplier must not be negative")
        if self.limits is not None:
            self.limits.check()

    def board_settings(self, profile_limits: BoardLimits | None = None) -> BoardSettings:
        """Return what `edgefl.core.local_round` needs to know of this board's settings.

        Args:
            profile_limits: the board profile's `[limits]`, used when `limits` is None.
        """
        return BoardSettings(
            device_id=self.device_id,
            task=self.task,
            privacy=self.privacy,
            codec=self.codec,
            personalize=self.personalize,
            train_backend=self.train_backend,
            limits=self.limits or profile_limits or BoardLimits(),
        )
