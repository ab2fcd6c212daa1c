"""The wire: topics, messages, the MQTT client, the embedded broker. The only place paho is used."""

from edgefl.transport.broker import BrokerAddress, EmbeddedBroker, parse_broker_url
from edgefl.transport.client import Message, MqttClient, PublishHandle, Will
from edgefl.transport.network_loop import NetworkLoop

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
