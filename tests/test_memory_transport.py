"""The in-process transport: topic tries, the broker's MQTT behaviour, and the same federation
over Mosquitto and over memory."""

from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from bundles import make_test_bundle
from click.testing import CliRunner
from conftest import RunningBroker, wait_for

from edgefl.bundle import ModelBundle
from edgefl.cli import main
from edgefl.core.settings import RoundPolicy, RoundSettings, TrainConfig
from edgefl.errors import BrokerUrlError, TransportError
from edgefl.head import Weights
from edgefl.simulation.runner import Simulation, SimulationConfig
from edgefl.simulation.workload import load_federated_data
from edgefl.transport.client import Message, MqttClient, Will
from edgefl.transport.connect import open_client
from edgefl.transport.memory import MemoryBroker, MemoryClient, find_broker
from edgefl.transport.network_loop import NetworkLoop
from edgefl.transport.tls import TlsSettings
from edgefl.transport.topic_tree import RetainedTree, SubscriptionTree, split_shared
from edgefl.transport.topics import matches

# (filter, topic, matches?) from MQTT 3.1.1 section 4.7 and its examples.
MATCHING = [
    ("sport/tennis/player1", "sport/tennis/player1", True),
    ("sport/tennis/player1", "sport/tennis/player2", False),
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("#", "sport/tennis", True),
    ("#", "/finance", True),
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("+/tennis/#", "sport/tennis", True),
    ("#", "$SYS/broker/load", False),
    ("+/broker/load", "$SYS/broker/load", False),
    ("$SYS/#", "$SYS/broker/load", True),
    ("$SYS/+/load", "$SYS/broker/load", True),
    ("edgefl/v1/f/rounds/+/update/+", "edgefl/v1/f/rounds/3/update/pi-01", True),
    ("edgefl/v1/f/rounds/+/update/+", "edgefl/v1/f/rounds/3/task", False),
    ("edgefl/v1/f/rounds/+/update/+", "edgefl/v1/g/rounds/3/update/pi-01", False),
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), MATCHING)
def test_topic_tries_match_as_mqtt_says(topic_filter: str, topic: str, expected: bool) -> None:
    assert matches(topic_filter, topic) is expected  # the client's own matcher agrees
    subscriptions: SubscriptionTree[str] = SubscriptionTree()
    subscriptions.add(topic_filter, "sub", 1)
    subscriptions.add("unrelated/level", "other", 1)
    assert ("sub" in subscriptions.match(topic)) is expected
    retained: RetainedTree[str] = RetainedTree()
    retained.set(topic, topic)
    retained.set("unrelated/level", "unrelated/level")
    assert (topic in list(retained.matching(topic_filter))) is expected


def test_subscription_tree_keeps_the_highest_qos_and_prunes_removed_filters() -> None:
    tree: SubscriptionTree[str] = SubscriptionTree()
    tree.add("a/+", "c1", 0)
    tree.add("a/#", "c1", 1)
    tree.add("a/b", "c2", 0)
    assert tree.match("a/b") == {"c1": 1, "c2": 0}
    tree.remove("a/#", "c1")
    tree.remove("a/b", "c2")
    assert tree.match("a/b") == {"c1": 0}
    tree.remove("a/+", "c1")
    assert tree.match("a/b") == {} and not tree._root.children


def test_split_shared_reads_the_group() -> None:
    assert split_shared("$share/ingest/edgefl/v1/f/rounds/+/update/+") == (
        "ingest",
        "edgefl/v1/f/rounds/+/update/+",
    )
    assert split_shared("a/b") == (None, "a/b")
    with pytest.raises(ValueError, match=r"\$share/GROUP/FILTER"):
        split_shared("$share/onlygroup")


# -- the broker and its clients --


class Inbox:
    """What one client received, with the thread each handler ran on."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.threads: set[str] = set()
        self.arrived = threading.Condition()

    def __call__(self, message: Message) -> None:
        with self.arrived:
            self.messages.append(message)
            self.threads.add(threading.current_thread().name)
            self.arrived.notify_all()

    def topics(self) -> list[str]:
        return [m.topic for m in self.messages]

    def wait_for_topic(self, topic: str, timeout: float = 5.0) -> Message:
        with self.arrived:
            assert self.arrived.wait_for(lambda: topic in self.topics(), timeout), self.topics()
            return next(m for m in self.messages if m.topic == topic)


@pytest.fixture
def broker() -> Iterator[MemoryBroker]:
    with MemoryBroker() as running:
        yield running


@pytest.fixture
def network() -> Iterator[NetworkLoop]:
    loop = NetworkLoop(name="memory-test")
    loop.start()
    yield loop
    loop.stop()


def _client(
    broker: MemoryBroker, network: NetworkLoop, name: str, **options: object
) -> MemoryClient:
    client = MemoryClient(broker.url, name, network=network, backoff_min_s=0.01, **options)  # type: ignore[arg-type]
    return client


def _sentinel(client: MemoryClient, inbox: Inbox, name: str) -> None:
    """Wait until everything routed to `client` before now was delivered: delivery is in order,
    so once a message published now arrives, nothing routed earlier is still on its way."""
    topic = f"sentinel/{name}"
    client.subscribe(topic, inbox)
    client.publish(topic, b"")
    inbox.wait_for_topic(topic)


def test_open_client_picks_the_transport_by_url(broker: MemoryBroker) -> None:
    memory_client, mqtt_client = (
        open_client(broker.url, "a"),
        open_client("mqtt://127.0.0.1:1", "b"),
    )
    for client in (memory_client, mqtt_client):
        client.network.stop()  # never started: this frees its loop's wake-up sockets
    assert isinstance(memory_client, MemoryClient) and isinstance(mqtt_client, MqttClient)
    with pytest.raises(BrokerUrlError, match="no TLS"):
        open_client(broker.url, "c", tls=TlsSettings(cafile="ca.pem"))


def test_connecting_to_a_broker_that_does_not_run_fails_at_once() -> None:
    client = MemoryClient("memory://nobody-here", "lonely")
    with pytest.raises(TransportError, match="no in-process broker named 'nobody-here'"):
        client.connect(timeout=10.0)


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), MATCHING[:16])
def test_the_broker_routes_by_filter(
    broker: MemoryBroker, network: NetworkLoop, topic_filter: str, topic: str, expected: bool
) -> None:
    inbox = Inbox()
    subscriber = _client(broker, network, "sub")
    subscriber.subscribe(topic_filter, inbox)
    subscriber.connect()
    publisher = _client(broker, network, "pub")
    publisher.connect()
    assert publisher.publish(topic, b"x").published
    _sentinel(subscriber, inbox, "route")
    assert (topic in inbox.topics()) is expected


def test_retained_messages_reach_later_subscribers_and_an_empty_one_clears(
    broker: MemoryBroker, network: NetworkLoop
) -> None:
    publisher = _client(broker, network, "pub")
    publisher.connect()
    live = Inbox()
    watcher = _client(broker, network, "watcher")
    watcher.subscribe("fleet/+/status", live)
    watcher.connect()
    publisher.publish("fleet/a/status", b"online", retain=True)
    publisher.publish("fleet/b/status", b"online", retain=True)
    publisher.publish("fleet/b/status", b"", retain=True)  # clears b
    assert live.wait_for_topic("fleet/a/status").retain is False  # live: retain flag off
    _sentinel(watcher, live, "w")
    assert [(m.topic, m.payload) for m in live.messages[:3]] == [
        ("fleet/a/status", b"online"),
        ("fleet/b/status", b"online"),
        ("fleet/b/status", b""),  # the clearing message is forwarded too, as Mosquitto does
    ]
    late = Inbox()
    newcomer = _client(broker, network, "newcomer")
    newcomer.subscribe("fleet/#", late)
    newcomer.connect()
    _sentinel(newcomer, late, "n")
    assert [(m.topic, m.payload, m.retain) for m in late.messages[:-1]] == [
        ("fleet/a/status", b"online", True)
    ]
    assert broker.retained_count == 1


def test_the_last_will_fires_on_an_abrupt_drop_and_not_on_a_clean_close(
    broker: MemoryBroker, network: NetworkLoop
) -> None:
    statuses = Inbox()
    watcher = _client(broker, network, "watcher")
    watcher.subscribe("devices/+/status", statuses)
    watcher.connect()
    will = Will("devices/pi-1/status", b"offline")
    board = _client(broker, network, "pi-1", will=will)
    board.connect()
    assert broker.drop("pi-1", hold_s=None)
    assert not board.connected
    assert statuses.wait_for_topic("devices/pi-1/status").payload == b"offline"
    broker.readmit("pi-1")
    assert board.wait_connected(5.0)  # it reconnects by itself, as MqttClient does
    calm = _client(broker, network, "pi-2", will=Will("devices/pi-2/status", b"offline"))
    calm.connect()
    calm.close()
    _sentinel(watcher, statuses, "w")
    assert "devices/pi-2/status" not in statuses.topics()
    # The will was retained: a dashboard that starts later sees the board offline.
    late = Inbox()
    dashboard = _client(broker, network, "dashboard")
    dashboard.subscribe("devices/+/status", late)
    dashboard.connect()
    assert late.wait_for_topic("devices/pi-1/status").payload == b"offline"


def test_a_persistent_session_gets_qos1_messages_published_while_it_was_away(
    broker: MemoryBroker, network: NetworkLoop
) -> None:
    sessions: list[bool] = []
    kept, fresh = Inbox(), Inbox()
    board = _client(broker, network, "board", persistent_session=True)
    board.subscribe("tasks/#", kept)
    board.on_connect(sessions.append)
    board.connect()
    passer = _client(broker, network, "passer")  # clean session: forgets on disconnect
    passer.subscribe("tasks/#", fresh)
    passer.connect()
    server = _client(broker, network, "server")
    server.connect()
    broker.drop("board", hold_s=None)
    broker.drop("passer", hold_s=None)
    server.publish("tasks/1", b"qos1", qos=1)
    server.publish("tasks/2", b"qos0", qos=0)
    broker.readmit("board")
    broker.readmit("passer")
    assert kept.wait_for_topic("tasks/1").payload == b"qos1"
    assert wait_for(lambda: passer.connected, 5.0)
    _sentinel(board, kept, "b")
    _sentinel(passer, fresh, "p")
    assert kept.topics()[:-1] == ["tasks/1"]  # QoS 0 is not queued for an offline session
    assert fresh.topics()[:-1] == []
    assert sessions == [False, True]  # the broker kept the board's session


def test_a_publish_made_while_offline_goes_out_after_the_reconnect(
    broker: MemoryBroker, network: NetworkLoop
) -> None:
    inbox = Inbox()
    reader = _client(broker, network, "reader")
    reader.subscribe("updates/+", inbox)
    reader.connect()
    board = _client(broker, network, "board")
    board.connect()
    broker.drop("board", hold_s=None)
    handle = board.publish("updates/board", b"delta", qos=1)
    assert not handle.published and not handle.wait(0.05)
    broker.readmit("board")
    assert handle.wait(5.0)
    assert inbox.wait_for_topic("updates/board").payload == b"delta"


def test_each_client_gets_messages_in_order_on_its_loop_thread_not_the_publishers(
    broker: MemoryBroker, network: NetworkLoop
) -> None:
    inbox = Inbox()
    reader = _client(broker, network, "reader")
    reader.subscribe("seq/#", inbox)
    reader.connect()
    publishers = [_client(broker, network, f"pub-{i}") for i in range(2)]
    for publisher in publishers:
        publisher.connect()

    def send(index: int) -> None:
        for n in range(500):
            publishers[index].publish(f"seq/{index}", str(n).encode())

    threads = [threading.Thread(target=send, args=(i,), name=f"publisher-{i}") for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _sentinel(reader, inbox, "r")
    for index in (0, 1):
        seen = [int(m.payload) for m in inbox.messages if m.topic == f"seq/{index}"]
        assert seen == list(range(500))
    assert inbox.threads == {"memory-test"}  # the loop thread, never a publisher's


def test_shared_subscriptions_take_turns_within_a_group(
    broker: MemoryBroker, network: NetworkLoop
) -> None:
    workers = [Inbox() for _ in range(3)]
    everything = Inbox()
    for i, inbox in enumerate(workers):
        worker = _client(broker, network, f"worker-{i}")
        worker.subscribe("$share/ingest/updates/+", inbox)
        worker.connect()
    monitor = _client(broker, network, "monitor")
    monitor.subscribe("updates/+", everything)
    monitor.connect()
    publisher = _client(broker, network, "pub")
    publisher.connect()
    for n in range(9):
        publisher.publish(f"updates/d{n}", b"u")
    _sentinel(monitor, everything, "m")
    assert wait_for(lambda: sum(len(w.messages) for w in workers) == 9, 5.0)
    assert [len(w.messages) for w in workers] == [3, 3, 3]
    assert len(everything.messages) == 10  # 9 updates and the sentinel


def test_oversized_messages_are_reported_not_delivered(
    broker: MemoryBroker, network: NetworkLoop
) -> None:
    dropped: list[tuple[str, int]] = []
    inbox = Inbox()
    reader = _client(
        broker,
        network,
        "reader",
        max_payload_bytes=10,
        on_oversized=lambda t, n: dropped.append((t, n)),
    )
    reader.subscribe("x/#", inbox)
    reader.connect()
    writer = _client(broker, network, "writer")
    writer.connect()
    writer.publish("x/big", b"0" * 11)
    _sentinel(reader, inbox, "r")
    assert dropped == [("x/big", 11)] and "x/big" not in inbox.topics()


# -- the same federation over Mosquitto and over memory --


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    return make_test_bundle(tmp_path_factory.mktemp("bundle") / "bundle")


def _federate(bundle: ModelBundle, broker_url: str) -> tuple[Weights, list[float]]:
    config = SimulationConfig(
        devices=5, policy=RoundPolicy(rounds=3, deadline_s=10.0),
        settings=RoundSettings(train=TrainConfig(seed=3)), partition="dirichlet:0.5", seed=3,
        broker_url=broker_url, fleet="same-heads",
    )  # fmt: skip
    simulation = Simulation(config, bundle, load_federated_data("digits"))
    metrics = simulation.run()
    assert [r.reported for r in metrics.rounds] == [5, 5, 5]
    heads = simulation.heads
    return heads["default"], [r.accuracy for r in metrics.rounds]


def test_the_same_federation_over_mosquitto_and_memory_gives_the_same_heads(
    bundle: ModelBundle, mosquitto: RunningBroker
) -> None:
    over_mqtt, accuracy_mqtt = _federate(bundle, mosquitto.url)
    over_memory, accuracy_memory = _federate(bundle, "memory")
    # Exactly: the aggregator sums accepted updates by device ID, not in arrival order, and
    # every device trains with the same seeds on the same data, so nothing the transport does
    # can change a bit of the result.
    assert over_mqtt.keys() == over_memory.keys()
    for key in over_mqtt:
        np.testing.assert_array_equal(over_mqtt[key], over_memory[key])
    assert accuracy_mqtt == accuracy_memory


def test_a_run_on_memory_starts_its_own_broker_and_stops_it() -> None:
    url = ""

    def seen(line: str) -> None:
        nonlocal url
        url = url or (line.split(" on ")[-1] if " devices on " in line else "")

    config = SimulationConfig(devices=2, policy=RoundPolicy(rounds=1), broker_url="memory")
    bundle_dir = make_test_bundle(Path(tempfile.mkdtemp()) / "bundle")
    Simulation(config, bundle_dir, load_federated_data("digits"), on_status=seen).run()
    assert url.startswith("memory://broker-")
    assert find_broker(url.removeprefix("memory://")) is None


def test_a_run_on_a_named_memory_broker_that_runs_uses_it_and_leaves_it_running(
    bundle: ModelBundle,
) -> None:
    with MemoryBroker("shared-test") as shared:
        _federate(bundle, "memory://shared-test")
        assert find_broker("shared-test") is shared
        # As on any broker it does not own, the run cleared its devices' retained statuses; the
        # three rounds' results stay retained, as they do on Mosquitto.
        assert shared.connection_count == 0 and shared.retained_count == 3


def test_edgefl_simulate_runs_over_the_in_process_broker(
    bundle: ModelBundle, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        ["simulate", "--devices", "4", "--rounds", "2", "--bundle", str(bundle.path),
         "--broker", "memory", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["reported"] for r in rounds] == [4, 4]


def test_edgefl_simulate_refuses_tls_files_and_the_dashboard_in_memory(
    bundle: ModelBundle, tmp_path: Path
) -> None:
    base = ["simulate", "--bundle", str(bundle.path), "--broker", "memory", "--out", str(tmp_path)]
    (tmp_path / "ca.pem").write_text("not read: refused before")
    for extra, says in [
        (["--cafile", str(tmp_path / "ca.pem")], "need --broker mqtts://"),
        (["--dashboard"], "--dashboard needs a network broker"),
    ]:
        result = CliRunner().invoke(main, [*base, *extra])
        assert result.exit_code == 2 and says in result.output, result.output


def test_a_will_function_makes_the_will_anew_for_each_connection(
    broker: MemoryBroker, network: NetworkLoop
) -> None:
    made: list[int] = []

    def will() -> Will:
        made.append(len(made) + 1)
        return Will("devices/pi-1/status", f"offline since connection {made[-1]}".encode())

    statuses = Inbox()
    watcher = _client(broker, network, "watcher")
    watcher.subscribe("devices/+/status", statuses)
    watcher.connect()
    board = _client(broker, network, "pi-1", will=will)
    board.connect()
    broker.drop("pi-1", hold_s=0.0)
    assert wait_for(lambda: board.connected, 5.0)  # reconnected by itself, with a new will
    broker.drop("pi-1", hold_s=None)
    _sentinel(watcher, statuses, "w")
    wills = [m.payload for m in statuses.messages if m.topic == "devices/pi-1/status"]
    assert wills == [b"offline since connection 1", b"offline since connection 2"]
