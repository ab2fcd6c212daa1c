"""Over-the-air updates wired up: an `Updater` bound to an MQTT client, and to a device agent.

The updater itself never touches the network; here its callables become publishes and
subscriptions on the board's client, and its install hook becomes the agent's bundle switch.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgefl.delivery.release import DeployReport
from edgefl.delivery.store import BundleStore
from edgefl.delivery.updater import Updater
from edgefl.errors import DeliveryError
from edgefl.transport import topics
from edgefl.transport.client import Message, MessageHandler
from edgefl.transport.connect import BrokerClient

if TYPE_CHECKING:
    from edgefl.roles.agent import Agent

DEFAULT_MODELS_DIR = Path("~/.local/share/edgefl/models")


def bind_updater(
    client: BrokerClient,
    store: BundleStore,
    fleet: str,
    device_id: str,
    *,
    trust_key: Ed25519PublicKey | None,
    add_handler: Callable[[str, MessageHandler], None] | None = None,
    seal: Callable[[str, bytes], bytes] | None = None,
    **options: Any,
) -> Updater:
    """Create an Updater whose messages travel over `client`, and subscribe it.

    Args:
        client: the board's MQTT client (the agent's own, or a dedicated one).
        store: where bundles are installed.
        fleet: the fleet.
        device_id: this board.
        trust_key: the publisher's public key (None refuses every release).
        add_handler: how to register a topic handler; default `client.subscribe`
            (the agent passes its `add_handler`).
        seal: seals a deploy report with the board's key (the agent's `auth.seal`); None
            publishes them unsigned.
        **options: the remaining `Updater` arguments (group, preferences, threads,
            on_installed, smoke_test, executor).

    Returns:
        The updater, listening on its release topics once the client is connected.
    """
    register = add_handler or client.subscribe
    report_topic = topics.deploy_report(fleet, device_id)

    def on_chunk(message: Message) -> None:
        updater.on_chunk(message.topic, message.payload)

    def report(message: DeployReport) -> None:
        data = message.to_bytes()
        client.publish(report_topic, seal(report_topic, data) if seal else data, qos=1,
                       retain=True)  # fmt: skip

    updater = Updater(
        store,
        fleet,
        device_id,
        trust_key=trust_key,
        report=report,
        subscribe=lambda f: client.subscribe(f, on_chunk),
        unsubscribe=client.unsubscribe,
        **options,
    )
    for topic in updater.release_topics():
        register(topic, lambda message: updater.on_release(message.payload))
    return updater


def attach_to_agent(
    agent: Agent,
    models_dir: str | Path,
    trust_key: Ed25519PublicKey | None,
    preferences: list[tuple[str, str]] | None = None,
    executor: Executor | None = None,
) -> Updater:
    """Give an agent over-the-air updates; call before `agent.start()`.

    The agent boots on the bundle installed in `models_dir` (unless it was given one), and every
    verified release is handed to its bundle hook, which computes features with the new backbone:
    if that fails too, the install is rolled back.

    Args:
        agent: the device agent (not started yet).
        models_dir: where this board keeps its bundles.
        trust_key: the publisher's public key (None refuses every release).
        preferences: backbone (format, precision) preferences from the board's profile.
        executor: where installs run (default: one worker thread per agent).

    Returns:
        The updater.

    Raises:
        BundleError: the models directory cannot be created.
    """
    store = BundleStore(models_dir)
    if agent.config.bundle_dir is None and store.current_path is not None:
        agent.config.bundle_dir = store.current_path
    return bind_updater(
        agent.client,
        store,
        agent.config.fleet,
        agent.device_id,
        trust_key=trust_key,
        group=agent.config.group or None,
        preferences=preferences,
        threads=agent.threads,
        add_handler=agent.add_handler,
        seal=agent.auth.seal,
        on_installed=agent.install_bundle,
        executor=executor,
    )


def enable_updates(
    agent: Agent,
    models_dir: str | Path | None,
    trust_key_file: str | Path | None,
) -> Updater:
    """Turn on over-the-air updates for an agent from its command-line settings.

    The board downloads the backbone its profile (`agent.profile`) prefers; without a profile,
    the first backbone of each release.

    Args:
        agent: the device agent (not started yet).
        models_dir: where bundles are installed; None uses ~/.local/share/edgefl/models.
        trust_key_file: the publisher's public key file; None refuses every release (and says so
            in the deploy report).

    Raises:
        KeyFileError: the key file is unreadable.
        DeliveryError: the group is not a valid name.
    """
    from edgefl import signing

    key = None if trust_key_file is None else signing.load_public_key(trust_key_file)
    preferences = agent.profile.prefer if agent.profile is not None else None
    try:
        return attach_to_agent(agent, models_dir or DEFAULT_MODELS_DIR, key, preferences)
    except ValueError as exc:
        raise DeliveryError(str(exc)) from exc
