"""Board-side head training: minibatch SGD with softmax cross-entropy and the FedProx term.

Two backends with the same math: "numpy" (hand-written forward and backward for linear/relu
heads) and "torch" (an nn.Sequential built from the same layer spec). "auto" picks numpy: boards
run without torch, the results agree to float32 rounding (see tests/core/test_training.py), and
for heads this small numpy's per-step overhead is lower than torch's, which is what lets one
process simulate a thousand devices. Both backends draw the minibatch order from the same
seeded numpy generator, so a run is reproducible and backend-independent.

A head's output operations (`HeadSpec.outputs`: a sigmoid, softmax or positive scaling after the
last Linear) take no part: the loss is cross-entropy on the logits, which is the right loss for
the arg-max these operations keep (`edgefl.head`), and accuracy is the logits' arg-max.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefl.core.settings import TrainConfig
from edgefl.head import Weights, head_forward

BACKENDS: tuple[str, ...] = ("auto", "numpy", "torch")
Layers = Sequence[Mapping[str, Any]]


@dataclass
class TrainResult:
    """Trained weights, and loss (mean cross-entropy) and accuracy of them on the local data.

    `steps` counts the minibatch steps taken; `stopped` is True when `stop` ended training
    before every epoch ran.
    """

    weights: Weights
    loss: float
    accuracy: float
    samples: int
    steps: int = 0
    stopped: bool = False


def _check_inputs(
    layers: Layers, weights: Mapping[str, np.ndarray], features: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return features as float32 (n, in) and labels as int64 (n,), or raise ValueError."""
    for index, layer in enumerate(layers):
        kind = layer.get("kind")
        if kind not in ("linear", "relu"):
            raise ValueError(f"head layer {index} has unsupported kind {kind!r} (linear, relu)")
        if kind == "linear":
            for name in (f"{index}.weight", f"{index}.bias"):
                if name not in weights:
                    raise ValueError(f"head weights lack {name}")
    linear = [i for i, layer in enumerate(layers) if layer["kind"] == "linear"]
    if not linear:
        raise ValueError("head has no linear layer to train")
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels)
    in_features = np.shape(weights[f"{linear[0]}.weight"])[1]
    outputs = np.shape(weights[f"{linear[-1]}.weight"])[0]
    if x.ndim != 2 or x.shape[1] != in_features:
        raise ValueError(f"features have shape {list(x.shape)}, expected [n, {in_features}]")
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"labels have shape {list(y.shape)}, expected [{len(x)}]")
    if len(y) and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= outputs):
        raise ValueError(f"labels must be in [0, {outputs}), got [{y.min()}, {y.max()}]")
    return x, y.astype(np.int64)


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy and its gradient with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    loss = float(np.mean(np.log(total[:, 0]) - shifted[rows, labels]))
    grad = exp / total
    grad[rows, labels] -= 1.0
    return loss, (grad / len(labels)).astype(np.float32)


def _numpy_gradients(
    layers: Layers, weights: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray
) -> tuple[float, Weights]:
    """Cross-entropy loss and gradients of every parameter, by explicit backpropagation."""
    inputs = []
    out = x
    for index, layer in enumerate(layers):
        inputs.append(out)
        if layer["kind"] == "linear":
            out = out @ weights[f"{index}.weight"].T + weights[f"{index}.bias"]
        else:
            out = np.maximum(out, 0.0)
    loss, grad = _cross_entropy(out, y)
    grads: Weights = {}
    for index in range(len(layers) - 1, -1, -1):
        if layers[index]["kind"] == "linear":
            grads[f"{index}.weight"] = grad.T @ inputs[index]
            grads[f"{index}.bias"] = grad.sum(axis=0)
            if index:
                grad = grad @ weights[f"{index}.weight"]
        else:
            grad = grad * (inputs[index] > 0)
    return loss, grads


def _proximal(
    weights: Mapping[str, np.ndarray], global_weights: Mapping[str, np.ndarray], mu: float
) -> tuple[float, Weights]:
    """FedProx's (mu/2)·||w - w_global||² and its gradient mu·(w - w_global)."""
    term, grads = 0.0, {}
    for key, value in weights.items():
        diff = value - global_weights[key]
        term += 0.5 * mu * float(np.vdot(diff, diff))
        grads[key] = (mu * diff).astype(np.float32)
    return term, grads


def head_gradients(
    layers: Layers,
    weights: Mapping[str, np.ndarray],
    features: np.ndarray,
    labels: np.ndarray,
    global_weights: Mapping[str, np.ndarray] | None = None,
    proximal_mu: float = 0.0,
    backend: str = "numpy",
) -> tuple[float, Weights]:
    """Return the training loss of a batch and the gradient of every head parameter.

    Args:
        layers: the head's layers (linear/relu, see `edgefl.bundle.HeadSpec`).
        weights: current parameters.
        features: (n, in_features) floats, n >= 1.
        labels: (n,) integer class indices.
        global_weights: the round's global weights, needed when proximal_mu > 0.
        proximal_mu: FedProx coefficient; the loss includes (mu/2)·||w - w_global||².
        backend: "numpy", "torch" or "auto" (= numpy).

    Returns:
        (loss, gradients keyed like `weights`), float32 gradients.

    Raises:
        ValueError: bad shapes, labels, layers or backend; mu > 0 without global weights.
    """
    x, y = _check_inputs(layers, weights, features, labels)
    if len(y) == 0:
        raise ValueError("cannot compute gradients on zero samples")
    if proximal_mu > 0 and global_weights is None:
        raise ValueError("proximal_mu > 0 needs the round's global weights")
    params = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
    anchor = {k: np.asarray(v, np.float32) for k, v in (global_weights or params).items()}
    if _resolve(backend) == "torch":
        model, torch = _torch_model(layers, params)
        loss_t = _torch_loss(model, torch, x, y, anchor, proximal_mu)
        loss_t.backward()
        return float(loss_t.item()), {
            name: p.grad.detach().numpy().copy() for name, p in model.named_parameters()
        }
    loss, grads = _numpy_gradients(layers, params, x, y)
    if proximal_mu > 0:
        term, prox = _proximal(params, anchor, proximal_mu)
        loss += term
        grads = {k: grads[k] + prox[k] for k in grads}
    return loss, grads


def train_head(
    layers: Layers,
    weights: Mapping[str, np.ndarray],
    features: np.ndarray,
    labels: np.ndarray,
    config: TrainConfig,
    backend: str = "auto",
    stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Fine-tune a head on local features with minibatch SGD.

    The given `weights` are the round's global head: the FedProx term pulls toward them.
    Each epoch visits the samples in an order drawn from `numpy.random.default_rng(config.seed)`.
    Weight decay follows torch's SGD: the step is lr·(grad + weight_decay·w).

    Args:
        layers: the head's layers (linear/relu).
        weights: starting (global) parameters; not modified.
        features: (n, in_features) floats, n >= 1.
        labels: (n,) integer class indices.
        config: epochs, learning rate, batch size, proximal mu, seed, weight decay.
        backend: "numpy", "torch" or "auto" (= numpy, see the module docstring).
        stop: asked before each minibatch step; True ends training there (a board's time
            budget). None trains every epoch.

    Returns:
        The trained weights (float32), their loss and accuracy on the local data, and how many
        steps ran.

    Raises:
        ValueError: bad shapes, labels, layers, config or backend; no samples.
    """
    config.check()
    x, y = _check_inputs(layers, weights, features, labels)
    if len(y) == 0:
        raise ValueError("cannot train a head on zero samples")
    start = {k: np.array(v, dtype=np.float32) for k, v in weights.items()}
    rng = np.random.default_rng(config.seed)
    batches = _Minibatches(rng, len(y), config, stop)
    if _resolve(backend) == "torch":
        trained = _train_torch(layers, start, x, y, config, batches)
    else:
        trained = _train_numpy(layers, start, x, y, config, batches)
    logits = head_forward(layers, trained, x)
    loss, _ = _cross_entropy(logits, y)
    accuracy = float((logits.argmax(axis=1) == y).mean())
    return TrainResult(
        trained, loss, accuracy, len(y), steps=batches.taken, stopped=batches.stopped
    )


class _Minibatches:
    """The minibatch index arrays of every epoch in order, until `stop()` says no more.

    Each epoch's order is drawn from `rng` when the epoch starts, so a huge epoch count costs
    no memory up front.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        samples: int,
        config: TrainConfig,
        stop: Callable[[], bool] | None,
    ) -> None:
        self.rng, self.samples, self.config, self.stop = rng, samples, config, stop
        self.taken, self.stopped = 0, False

    def __iter__(self) -> Iterator[np.ndarray]:
        size = self.config.batch_size
        for _ in range(self.config.epochs):
            order = self.rng.permutation(self.samples)
            for begin in range(0, len(order), size):
                if self.stop is not None and self.stop():
                    self.stopped = True
                    return
                self.taken += 1
                yield order[begin : begin + size]


def _resolve(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown training backend {backend!r}; choose one of: {BACKENDS}")
    return "numpy" if backend == "auto" else backend


def _train_numpy(
    layers: Layers,
    start: Weights,
    x: np.ndarray,
    y: np.ndarray,
    config: TrainConfig,
    batches: Iterable[np.ndarray],
) -> Weights:
    params = {k: v.copy() for k, v in start.items()}
    lr = np.float32(config.lr)
    mu, decay = np.float32(config.proximal_mu), np.float32(config.weight_decay)
    for batch in batches:
        _, grads = _numpy_gradients(layers, params, x[batch], y[batch])
        for key, grad in grads.items():
            value = params[key]
            if mu:
                grad = grad + mu * (value - start[key])
            if decay:
                grad = grad + decay * value
            value -= lr * grad
    return params


def _torch_model(layers: Layers, params: Mapping[str, np.ndarray]) -> tuple[Any, Any]:
    """Build the nn.Sequential of a head spec with the given parameters; import torch lazily."""
    import torch

    modules: list[Any] = []
    for index, layer in enumerate(layers):
        if layer["kind"] == "linear":
            out_features, in_features = params[f"{index}.weight"].shape
            modules.append(torch.nn.Linear(int(in_features), int(out_features)))
        else:
            modules.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*modules)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in params.items()})
    return model, torch


def _torch_loss(
    model: Any,
    torch: Any,
    x: np.ndarray,
    y: np.ndarray,
    anchor: Mapping[str, np.ndarray],
    mu: float,
) -> Any:
    logits = model(torch.from_numpy(x))
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y))
    if mu > 0:
        for name, param in model.named_parameters():
            loss = loss + 0.5 * mu * ((param - torch.from_numpy(anchor[name])) ** 2).sum()
    return loss


def _train_torch(
    layers: Layers,
    start: Weights,
    x: np.ndarray,
    y: np.ndarray,
    config: TrainConfig,
    batches: Iterable[np.ndarray],
) -> Weights:
    model, torch = _torch_model(layers, start)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    for batch in batches:
        optimizer.zero_grad()
        _torch_loss(model, torch, x[batch], y[batch], start, config.proximal_mu).backward()
        optimizer.step()
    return {name: p.detach().numpy().copy() for name, p in model.state_dict().items()}
