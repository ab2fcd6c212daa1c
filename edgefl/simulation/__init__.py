"""Simulate a fleet on one machine: the real agents and aggregator over a real broker."""
