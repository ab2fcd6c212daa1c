"""The roles built on the core and the transport: the device agent and the aggregator."""
