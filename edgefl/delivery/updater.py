"""The board side of a deploy: take a signed release, fetch only what this board runs, install it.

`Updater` is the state machine, with its I/O passed in as callables (report, subscribe,
unsubscribe) so tests drive it with literal messages. `updater_binding` binds it to an MQTT client
and an agent; `smoke_test` holds the check that a freshly installed bundle runs.

For every release it receives, a board:
  1. checks the Ed25519 signature over the exact signed bytes against its trusted key, and only
     then parses them (unsigned, wrong or malformed: refused, never remembered: a forged retained
     message must not keep a board from the genuine release on another topic or later),
  2. checks it is targeted and newer than what it runs (older: refused, rollback protection),
  3. picks the backbone its profile prefers and subscribes to the chunks of that file and the heads,
  4. checks each chunk's SHA-256 from the signed release as it arrives: a bad chunk is discarded
     and fetched again (a few times, then it waits for a genuine copy and says so); an index
     the release does not have is ignored,
  5. checks each artifact's size and SHA-256 against the signed manifest,
  6. stages the files, swaps `current` atomically, runs a smoke inference in the real runtime,
  7. on failure swaps back to the previous bundle (rolled back), and reports the outcome.

Only a genuinely signed release that failed its install (manifest mismatch, rolled back) is
remembered as refused in state.json; nothing a third party can publish is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefl import signing
from edgefl.bundle import Artifact, Manifest, ModelBundle, load_bundle
from edgefl.delivery.chunks import ChunkAssembler, ChunkError
from edgefl.delivery.release import (
    CURRENT,
    DOWNLOADING,
    FAILED,
    INSTALLED,
    REFUSED,
    ROLLED_BACK,
    DeployReport,
    Release,
    release_id,
)
from edgefl.delivery.smoke_test import SmokeTest, smoke_inference
from edgefl.delivery.store import BundleStore
from edgefl.errors import EdgeflError
from edgefl.transport import topics

log = logging.getLogger(__name__)

Report = Callable[[DeployReport], None]
Installed = Callable[[ModelBundle], None]

# Progress is reported every tenth of the download, so 50 boards do not flood the broker.
_PROGRESS_STEPS = 10
# Refusals remembered in state.json: enough that a retained bad release is not retried on every
# reconnect, few enough that the file stays small.
_REMEMBERED_REFUSALS = 20
# A chunk that fails its SHA-256 is fetched again this many times (a stray copy published live is
# replaced by the retained genuine one); then the board waits for a genuine copy to be published.
MAX_REFETCHES = 3


@dataclass
class _Download:
    release: Release
    payload: bytes
    name: str
    backbone: Artifact
    artifacts: dict[str, Artifact]
    assemblers: dict[str, ChunkAssembler]
    filters: list[str]
    next_step: int = 1
    bad_chunks: dict[str, int] = dataclasses.field(default_factory=dict)  # topic -> failures

    @property
    def total_bytes(self) -> int:
        return sum(a.size for a in self.assemblers.values())

    @property
    def received_bytes(self) -> int:
        return sum(a.bytes_received for a in self.assemblers.values())


class Updater:
    """One board's update state machine (thread-safe: messages arrive on the network thread)."""

    def __init__(
        self,
        store: BundleStore,
        fleet: str,
        device_id: str,
        *,
        trust_key: Ed25519PublicKey | None,
        group: str | None = None,
        preferences: list[tuple[str, str]] | None = None,
        threads: int = 1,
        report: Report,
        subscribe: Callable[[str], None],
        unsubscribe: Callable[[str], None],
        on_installed: Installed | None = None,
        smoke_test: SmokeTest | None = None,
        executor: Executor | None = None,
    ) -> None:
        """Configure the updater; nothing happens until a release arrives.

        Args:
            store: where bundles are installed.
            fleet: the fleet (for chunk topics).
            device_id: this board.
            trust_key: the publisher's public key; None refuses every release (nothing to
                check it against).
            group: this board's group, for group-targeted releases.
            preferences: (format, precision) backbone preferences from the board's profile.
            threads: runtime threads for the smoke inference.
            report: publishes a DeployReport (retained) for the deploy command and fleet view.
            subscribe: subscribes to a chunk topic filter (messages go to `on_chunk`).
            unsubscribe: drops a chunk topic filter.
            on_installed: called with the new bundle after the smoke inference (the agent
                switches to it here); raising rolls the install back.
            smoke_test: replaces `smoke_inference` (tests); raising SmokeTestError rolls back.
            executor: where installs run, off the network thread; default one worker thread.
        """
        self.store = store
        self.fleet = fleet
        self.device_id = device_id
        self.group = group
        self.trust_key = trust_key
        self.preferences = preferences
        self.threads = threads
        self._report = report
        self._subscribe = subscribe
        self._unsubscribe = unsubscribe
        self._on_installed = on_installed
        self._smoke_test = smoke_test or (lambda b, a: smoke_inference(b, a, self.threads))
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="edgefl-install")
        self._lock = threading.RLock()
        self._download: _Download | None = None
        self._installing = False
        self.last_report: DeployReport | None = None

    @property
    def running_version(self) -> int:
        """The version of the bundle this board runs (0 before the first install)."""
        return self.store.current_version()

    def release_topics(self) -> list[str]:
        """The retained release topics this board listens on."""
        return topics.release_topics_for(self.fleet, self.device_id, self.group)

    # -- messages --

    def on_release(self, payload: bytes) -> None:
        """Handle a release message (retained, so also on every (re)connect). Never raises."""
        if not payload:
            return  # a cleared retained topic
        with self._lock:
            try:
                self._handle_release(payload)
            except Exception as exc:  # a bad message must never stop the agent
                log.exception("%s: release handling failed", self.device_id)
                self._send(0, FAILED, f"release handling failed: {exc}")

    def on_chunk(self, topic: str, payload: bytes) -> None:
        """Handle one artifact chunk. Never raises."""
        parsed = topics.parse_chunk(topic)
        if parsed is None or not payload:
            return
        version, file, index = parsed
        with self._lock:
            download = self._download
            if (
                download is None
                or self._installing
                or version != download.release.manifest.version
                or file not in download.assemblers
            ):
                return  # a chunk of another release or artifact: not for this board now
            assembler = download.assemblers[file]
            if not 0 <= index < assembler.total or assembler.has(index):
                return  # not a chunk of this release, or one already verified: nothing to do
            try:
                assembler.add(index, payload)
            except ChunkError as exc:
                self._refetch(download, file, index, exc)
                return
            self._progress(download)
            if all(a.complete for a in download.assemblers.values()):
                self._installing = True
                self._executor.submit(self._install, download)

    # -- internals (called with the lock held) --

    def _handle_release(self, payload: bytes) -> None:
        try:
            envelope = signing.Envelope.from_bytes(payload, "release")
        except EdgeflError as exc:
            self._unverified(0, str(exc), "")
            return
        rid = release_id(envelope)
        download = self._download
        if download is not None and download.release.release_id == rid:
            return  # the same release again (a reconnect): keep downloading
        if self._installing:
            return  # the retained release is re-read after the install finishes
        if self.trust_key is None:
            self._unverified(0, "the agent has no trusted key configured (`trust_key`)", rid)
            return
        try:
            envelope.verify(self.trust_key)
            release = Release.from_signed(envelope)
            manifest = release.manifest
        except EdgeflError as exc:
            self._unverified(0, str(exc), rid)
            return
        version = manifest.version
        name = f"v{version}-{rid}"
        if not release.targets.includes(self.device_id, self.group):
            return  # signed for other boards; someone re-posted it here
        state = self.store.state()
        if name in state.rejected:
            self._send(version, REFUSED, state.rejected[name], release_id=rid)
            return
        running = max(self.store.current_version(), state.highest_version)
        if version < running:
            self._send(
                version,
                REFUSED,
                f"version {version} is older than the running version {running}"
                " (rollback protection)",
                release_id=rid,
            )
            return
        if version == running:
            self._send(version, CURRENT, "", release_id=rid)
            return
        try:
            backbone = manifest.select_backbone(self.preferences)
            wanted = [backbone, *[a for a in manifest.artifacts if a.role == "head"]]
            assemblers = {
                a.file: ChunkAssembler(a.size, release.chunk_size, release.chunks[a.file])
                for a in wanted
            }
        except KeyError as exc:
            self._send(version, REFUSED, f"release lists no chunks for {exc}", release_id=rid)
            return
        except EdgeflError as exc:
            self._send(version, REFUSED, str(exc), release_id=rid)
            return
        if download is not None:
            self._drop_filters(download)
        new = _Download(
            release=release,
            payload=payload,
            name=name,
            backbone=backbone,
            artifacts={a.file: a for a in wanted},
            assemblers=assemblers,
            filters=[topics.artifact_chunks(self.fleet, version, a.file) for a in wanted],
        )
        self._download = new
        self._send(version, DOWNLOADING, "", 0, new.total_bytes, rid)
        for topic_filter in new.filters:
            self._subscribe(topic_filter)

    def _progress(self, download: _Download) -> None:
        total = max(download.total_bytes, 1)
        done = download.received_bytes
        if done * _PROGRESS_STEPS >= download.next_step * total and done < total:
            download.next_step = done * _PROGRESS_STEPS // total + 1
            self._send(
                download.release.manifest.version,
                DOWNLOADING,
                "",
                done,
                download.total_bytes,
                download.release.release_id,
            )

    def _refetch(self, download: _Download, file: str, index: int, error: ChunkError) -> None:
        """Discard a chunk that failed its check and subscribe to its topic again.

        Re-subscribing makes the broker send the retained copy again: a stray copy published
        live is replaced by the genuine one. A bad copy retained in place of the genuine one
        comes back each time, so after MAX_REFETCHES the board stops asking, reports why, and
        keeps listening: it installs as soon as a genuine copy is published (a deploy again).
        """
        release = download.release
        version = release.manifest.version
        topic = topics.artifact_chunk(self.fleet, version, file, index)
        failures = download.bad_chunks[topic] = download.bad_chunks.get(topic, 0) + 1
        if failures <= MAX_REFETCHES:
            log.warning(
                "%s: %s: %s; fetching it again (%d of %d)",
                self.device_id, file, error, failures, MAX_REFETCHES,
            )  # fmt: skip
            if topic in download.filters:
                self._unsubscribe(topic)
            else:
                download.filters.append(topic)
            self._subscribe(topic)
        elif failures == MAX_REFETCHES + 1:
            self._send(
                version,
                FAILED,
                f"{file}: {error}, {failures} times; waiting for a genuine copy"
                " (deploy the release again or clear the stray chunk)",
                download.received_bytes,
                download.total_bytes,
                release.release_id,
            )

    def _unverified(self, version: int, reason: str, rid: str) -> None:
        """Refuse a release message that cannot be verified or parsed, without remembering it.

        While a verified release downloads or installs, it is only logged: anyone can publish
        such a message, and its report must not stand for the genuine release's.
        """
        if self._download is not None or self._installing:
            log.warning("%s: ignored a release message: %s", self.device_id, reason)
            return
        self._send(version, REFUSED, reason, release_id=rid)

    def _drop_filters(self, download: _Download) -> None:
        for topic_filter in download.filters:
            self._unsubscribe(topic_filter)

    def _reject(self, name: str, reason: str) -> None:
        state = self.store.state()
        state.rejected[name] = reason
        state.rejected = dict(list(state.rejected.items())[-_REMEMBERED_REFUSALS:])
        self.store.save_state(state)

    def _send(
        self,
        version: int,
        state: str,
        reason: str,
        received: int = 0,
        total: int = 0,
        release_id: str = "",
    ) -> None:
        report = DeployReport(
            device_id=self.device_id,
            version=version,
            state=state,
            release_id=release_id,
            running_version=self.store.current_version(),
            reason=reason,
            received_bytes=received,
            total_bytes=total,
            time=time.time(),
        )
        self.last_report = report
        if state != DOWNLOADING:
            log.info("%s: release v%d %s %s", self.device_id, version, state, reason)
        try:
            self._report(report)
        except Exception:
            log.exception("%s: cannot publish the deploy report", self.device_id)

    # -- install (worker thread) --

    def _install(self, download: _Download) -> None:
        version = download.release.manifest.version
        try:
            outcome, reason = self._install_files(download)
        except Exception as exc:  # disk full, permissions: keep running the old bundle
            log.exception("%s: install failed", self.device_id)
            outcome, reason = FAILED, f"install failed: {exc}"
        with self._lock:
            self._drop_filters(download)
            self._download = None
            self._installing = False
            if outcome in (REFUSED, ROLLED_BACK):
                self._reject(download.name, reason)
            self._send(version, outcome, reason, release_id=download.release.release_id)

    def _install_files(self, download: _Download) -> tuple[str, str]:
        manifest = download.release.manifest
        files: dict[str, bytes] = {}
        for file, assembler in download.assemblers.items():
            data = assembler.data()
            artifact = download.artifacts[file]
            if len(data) != artifact.size or hashlib.sha256(data).hexdigest() != artifact.sha256:
                return REFUSED, f"{file} does not match the SHA-256 in the signed manifest"
            files[file] = data
        # The board's manifest lists only what it downloaded, so the directory is a complete
        # bundle `load_bundle` verifies; the signed full text (the bundle's digest) beside it.
        local = Manifest.from_json(download.release.manifest_json)
        local.artifacts = [a for a in local.artifacts if a.file in files]
        release_dir = self.store.stage(
            download.name,
            files,
            json.dumps(local.to_dict(), indent=2),
            download.payload,
            download.release.manifest_json,
        )
        self.store.activate(release_dir)
        try:
            bundle = load_bundle(release_dir)
            self._smoke_test(bundle, download.backbone)
            if self._on_installed is not None:
                self._on_installed(bundle)
        except Exception as exc:
            restored = self.store.roll_back()
            if restored is not None and self._on_installed is not None:
                try:
                    self._on_installed(load_bundle(restored, verify=False))
                except Exception:
                    log.exception("%s: reloading the previous bundle failed", self.device_id)
            reason = str(exc) if isinstance(exc, EdgeflError) else f"{type(exc).__name__}: {exc}"
            label = (
                "none"
                if restored is None
                else f"v{load_bundle(restored, verify=False).manifest.version}"
            )
            return ROLLED_BACK, f"{reason}; rolled back to {label}"
        state = self.store.state()
        state.highest_version = max(state.highest_version, manifest.version)
        self.store.save_state(state)
        self.store.prune()
        return INSTALLED, ""
