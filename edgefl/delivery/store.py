"""A board's installed bundles on disk: stage, swap atomically, roll back, remember versions.

Layout under the models directory (e.g. /var/lib/edgefl/models):

    releases/v{version}-{id}/   one installed bundle: the artifacts this board downloaded, a
                                manifest.json listing just those, full-manifest.json (the
                                release's manifest text: the bundle's digest) and release.json
                                (the release message as received)
    current -> releases/...     the bundle the agent runs (a symlink, replaced with one rename)
    previous -> releases/...    what `current` pointed to before the last install
    state.json                  highest version installed, versions refused and why
    staging/                    partial downloads; cleared on start

A power cut at any point leaves `current` pointing at a complete bundle: files are written and
fsynced under staging/, renamed into releases/, and only then is the symlink replaced.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgefl.atomic import replace_symlink, replacing_dir, write_atomic
from edgefl.bundle import FULL_MANIFEST_FILE, MANIFEST_FILE, ModelBundle, load_bundle
from edgefl.errors import BundleError

RELEASE_FILE = "release.json"
STATE_FILE = "state.json"


@dataclass
class StoreState:
    """What the board remembers across restarts for rollback protection."""

    highest_version: int = 0
    # version -> reason, for releases refused or rolled back (not retried on every reconnect)
    rejected: dict[str, str] = field(default_factory=dict)


class BundleStore:
    """The installed bundles of one board."""

    def __init__(self, root: str | Path) -> None:
        """Open (and create) a models directory; leftovers of interrupted downloads are removed.

        Raises:
            BundleError: the directory cannot be created.
        """
        self.root = Path(root).expanduser()
        try:
            (self.root / "releases").mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.root / "staging", ignore_errors=True)
            (self.root / "staging").mkdir()
        except OSError as exc:
            raise BundleError(f"cannot use models directory {self.root}: {exc}") from exc

    # -- state --

    def state(self) -> StoreState:
        """Return the remembered state (a fresh one when none was written)."""
        path = self.root / STATE_FILE
        try:
            data = json.loads(path.read_text())
            return StoreState(int(data["highest_version"]), dict(data.get("rejected", {})))
        except (OSError, ValueError, KeyError, TypeError):
            return StoreState()

    def save_state(self, state: StoreState) -> None:
        """Write the state atomically."""
        write_atomic(self.root / STATE_FILE, json.dumps(asdict(state)).encode())

    # -- bundles --

    @property
    def current_path(self) -> Path | None:
        """The directory of the running bundle, or None before the first install."""
        link = self.root / "current"
        return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None

    @property
    def previous_path(self) -> Path | None:
        """The directory of the bundle before the last install, or None."""
        link = self.root / "previous"
        return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None

    def current(self) -> ModelBundle | None:
        """Return the running bundle (manifest only; files were checked when installed)."""
        path = self.current_path
        return None if path is None else load_bundle(path, verify=False)

    def current_version(self) -> int:
        """Return the running bundle's version, 0 when none."""
        bundle = self.current()
        return 0 if bundle is None else bundle.manifest.version

    def stage(
        self,
        name: str,
        files: dict[str, bytes],
        manifest_json: str,
        release: bytes,
        full_manifest_json: str | None = None,
    ) -> Path:
        """Write a bundle's files under staging/, fsync them, and move them into releases/.

        Args:
            name: the release directory's name (unique per release).
            files: artifact file name -> contents (already verified).
            manifest_json: the board's manifest (listing only the files it downloaded).
            release: the signed release message, kept so the board can re-check it later.
            full_manifest_json: the release's full manifest text, when `manifest_json` lists
                only some of its artifacts; the loaded bundle's digest is this text's.

        Returns:
            The new release directory.

        Raises:
            BundleError: the files cannot be written.
        """
        target = self.root / "releases" / name
        try:
            with replacing_dir(target, staging_root=self.root / "staging") as staging:
                extra = (
                    {} if full_manifest_json is None else {FULL_MANIFEST_FILE: full_manifest_json}
                )
                for file, data in {
                    **files,
                    MANIFEST_FILE: manifest_json.encode(),
                    RELEASE_FILE: release,
                    **{k: v.encode() for k, v in extra.items()},
                }.items():
                    (staging / file).write_bytes(data)
        except OSError as exc:
            raise BundleError(f"cannot write the new bundle to {target}: {exc}") from exc
        return target

    def activate(self, release_dir: Path) -> None:
        """Point `current` at `release_dir` (one atomic rename); the old one becomes `previous`."""
        old = self.current_path
        self._point("current", release_dir)
        if old is not None and old != release_dir.resolve():
            self._point("previous", old)

    def roll_back(self) -> Path | None:
        """Point `current` back at `previous` (or remove it when there was none).

        Returns:
            The directory now current, or None.
        """
        failed = self.current_path
        previous = self.previous_path
        if previous is not None:
            self._point("current", previous)
        else:
            with contextlib.suppress(FileNotFoundError):
                (self.root / "current").unlink()
        if failed is not None and failed != previous:
            shutil.rmtree(failed, ignore_errors=True)
        return previous

    def prune(self) -> None:
        """Remove installed releases other than `current` and `previous`."""
        keep = {p for p in (self.current_path, self.previous_path) if p is not None}
        for entry in (self.root / "releases").iterdir():
            if entry.resolve() not in keep:
                shutil.rmtree(entry, ignore_errors=True)

    def _point(self, link_name: str, target: Path) -> None:
        replace_symlink(self.root / link_name, target)
