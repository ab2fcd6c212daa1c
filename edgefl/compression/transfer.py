"""Transfer learning: a fresh head for K classes, trained on the user's data.

With the backbone frozen (the default) the features are computed once and only the head trains,
as on a board. `--finetune all` or `--finetune N` also unfreezes all or the last N backbone blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from edgefl.compression.distill import Progress, predict
from edgefl.data import Dataset
from edgefl.errors import InputError
from edgefl.models.split import SplitModel, backbone_blocks

Finetune = str | int | None


def parse_finetune(value: str | None) -> Finetune:
    """Parse `--finetune`: None (frozen backbone), "all", or a positive number of blocks.

    Raises:
        InputError: anything else.
    """
    if value is None or value == "all":
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise InputError(f"`finetune` takes 'all' or a positive number of blocks, not {value!r}")


def replace_head(split: SplitModel, num_classes: int, seed: int = 0) -> None:
    """Give `split` a freshly initialised head with the same layers and `num_classes` outputs.

    Raises:
        InputError: `num_classes` is below 2.
    """
    if num_classes < 2:
        raise InputError(f"`num_classes` must be at least 2, not {num_classes}")
    layers = split.head_layers()
    last = max(i for i, layer in enumerate(layers) if layer["kind"] == "linear")
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        modules: list[nn.Module] = []
        for index, layer in enumerate(layers):
            if layer["kind"] == "linear":
                out = num_classes if index == last else int(layer["out"])
                modules.append(nn.Linear(int(layer["in"]), out))
            else:
                modules.append(nn.ReLU())
    finally:
        torch.set_rng_state(state)
    split.head = nn.Sequential(*modules)


def train_head(
    split: SplitModel,
    train: Dataset,
    finetune: Finetune = None,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 64,
    progress: Progress | None = None,
    seed: int = 0,
) -> list[float]:
    """Train the head (and the unfrozen backbone blocks) with cross-entropy and Adam.

    Args:
        split: the model, changed in place and left in eval mode.
        train: labelled samples; labels must be below the head's output count.
        finetune: None trains the head only; "all" or N also trains all or the last N blocks.
        epochs, lr, batch_size: the training schedule.
        progress: called with (epoch done, epochs).
        seed: shuffling seed.

    Returns:
        The mean loss of every epoch.

    Raises:
        InputError: a label is out of range for the head.
    """
    outputs = split.head_linears()[-1].out_features
    if len(train) and int(train.y.max()) >= outputs:
        raise InputError(
            f"the data has label {int(train.y.max())} but the head has {outputs} outputs; "
            "give `num_classes`"
        )
    blocks = backbone_blocks(split.backbone)
    if finetune == "all":
        trainable = blocks
    elif isinstance(finetune, int):
        trainable = blocks[-finetune:]
    else:
        trainable = []
    for parameter in split.backbone.parameters():
        parameter.requires_grad_(False)
    for block in trainable:
        for parameter in block.parameters():
            parameter.requires_grad_(True)
    # Frozen backbone: features once, then only the head runs, which is seconds even for ResNet.
    inputs = torch.from_numpy(predict(split.backbone, train.X) if not trainable else train.X)
    targets = torch.from_numpy(train.y)
    params = [p for p in split.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    try:
        for epoch in range(epochs):
            split.head.train()
            for block in trainable:
                block.train()
            total = 0.0
            for batch in torch.randperm(len(targets), generator=generator).split(batch_size):
                optimizer.zero_grad()
                features = split.backbone(inputs[batch]) if trainable else inputs[batch]
                loss = nn.functional.cross_entropy(split.head(features), targets[batch])
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
            losses.append(total / max(len(targets), 1))
            if progress is not None:
                progress(epoch + 1, epochs)
    finally:
        for parameter in split.parameters():
            parameter.requires_grad_(True)
        split.eval()
    return losses
