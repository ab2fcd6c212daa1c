"""Pure federation core: aggregation, strategies, update codecs, privacy, validation, training."""
