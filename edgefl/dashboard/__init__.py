"""The fleet dashboard: a read-only web page of a fleet's devices, rounds, deploys and privacy.

`fleet_state` folds the fleet's MQTT messages into a snapshot (pure), `view` turns a snapshot and
the aggregator's record into the page's JSON (pure), `record_reader` opens that record read-only,
`watcher` subscribes (never publishes) and `server` serves the page, the JSON and live events.
"""
