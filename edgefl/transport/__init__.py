"""The wire: topics, messages, the MQTT client, the embedded broker. The only place paho is used."""

from edgefl.transport.broker import BrokerAddress, EmbeddedBroker, parse_broker_url
from edgefl.transport.client import Message, MqttClient, PublishHandle, Will
from edgefl.transport.network_loop import NetworkLoop
from edgefl.transport.tls import TlsSettings

__all__ = [
    "BrokerAddress",
    "EmbeddedBroker",
    "Message",
    "MqttClient",
    "NetworkLoop",
    "PublishHandle",
    "TlsSettings",
    "Will",
    "parse_broker_url",
]
