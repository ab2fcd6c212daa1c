"""The wire: topics, messages, the MQTT client, the embedded broker. The only place paho is used."""

from edgefl.transport.broker import BrokerAddress, EmbeddedBroker, parse_broker_url
from edgefl.transport.client import Message, MqttClient, NetworkLoop, PublishHandle, Will

__all__ = [
    "BrokerAddress",
    "EmbeddedBroker",
    "Message",
    "MqttClient",
    "NetworkLoop",
    "PublishHandle",
    "Will",
    "parse_broker_url",
]
