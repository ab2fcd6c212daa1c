"""Compression: prune, distill, quantize and export a model into bundle artifacts."""
