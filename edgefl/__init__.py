"""edgefl: compress a pretrained PyTorch model, ship it to small boards, keep it learning there."""

__version__ = "0.1.0"
