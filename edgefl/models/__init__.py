"""Models in: built-in architectures, user factories and weights, and the backbone + head split."""

from edgefl.models.loading import LoadedModel, load_model, resolve_model
from edgefl.models.split import SplitModel, split_model

__all__ = ["LoadedModel", "SplitModel", "load_model", "resolve_model", "split_model"]
