"""Head training: numpy and torch agree, SGD learns, FedProx pulls toward the global head."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from edgefl.core.settings import TrainConfig
from edgefl.core.training import head_gradients, train_head
from edgefl.head import init_head

MLP: list[dict[str, Any]] = [
    {"kind": "linear", "in": 64, "out": 32},
    {"kind": "relu"},
    {"kind": "linear", "in": 32, "out": 10},
]
LINEAR: list[dict[str, Any]] = [{"kind": "linear", "in": 64, "out": 10}]


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    return (x / 16).astype(np.float32), y.astype(np.int64)


def test_numpy_and_torch_gradients_agree_with_fedprox(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = digits[0][:40], digits[1][:40]
    weights, global_weights = init_head(MLP, seed=1), init_head(MLP, seed=2)
    loss_np, grads_np = head_gradients(MLP, weights, x, y, global_weights, proximal_mu=0.5)
    loss_t, grads_t = head_gradients(
        MLP, weights, x, y, global_weights, proximal_mu=0.5, backend="torch"
    )
    assert loss_np == pytest.approx(loss_t, rel=1e-5)
    assert set(grads_np) == set(grads_t) == set(weights)
    for key in weights:
        np.testing.assert_allclose(grads_np[key], grads_t[key], atol=1e-5, rtol=1e-5)
    # The proximal term is really in there: without it the gradient changes.
    _, plain = head_gradients(MLP, weights, x, y)
    assert not np.allclose(plain["0.weight"], grads_np["0.weight"], atol=1e-3)


def test_numpy_gradient_matches_finite_differences(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits[0][:20].astype(np.float64), digits[1][:20]
    weights = {k: v.astype(np.float64) for k, v in init_head(MLP, seed=3).items()}
    _, grads = head_gradients(MLP, weights, x, y)
    for key, index in (("2.bias", (4,)), ("0.weight", (5, 20)), ("2.weight", (1, 7))):
        eps = 1e-3
        up = {k: v.copy() for k, v in weights.items()}
        down = {k: v.copy() for k, v in weights.items()}
        up[key][index] += eps
        down[key][index] -= eps
        numeric = (head_gradients(MLP, up, x, y)[0] - head_gradients(MLP, down, x, y)[0]) / (
            2 * eps
        )
        assert grads[key][index] == pytest.approx(numeric, abs=2e-4)


def test_one_epoch_gives_the_same_weights_on_both_backends(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = digits[0][:200], digits[1][:200]
    config = TrainConfig(epochs=1, lr=0.1, batch_size=16, proximal_mu=0.01, weight_decay=1e-3)
    start = init_head(MLP, seed=0)
    by_numpy = train_head(MLP, start, x, y, config, backend="numpy")
    by_torch = train_head(MLP, start, x, y, config, backend="torch")
    for key in start:
        np.testing.assert_allclose(by_numpy.weights[key], by_torch.weights[key], atol=1e-5)
        assert not np.allclose(by_numpy.weights[key], start[key])
    assert by_numpy.loss == pytest.approx(by_torch.loss, rel=1e-5)
    assert by_numpy.samples == 200


def test_training_learns_digits(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    start = init_head(LINEAR)
    before = train_head(LINEAR, start, x, y, TrainConfig(epochs=0))
    after = train_head(LINEAR, start, x, y, TrainConfig(epochs=3))
    assert before.accuracy < 0.3
    assert after.accuracy > 0.9
    assert after.loss < before.loss / 3
    np.testing.assert_array_equal(before.weights["0.weight"], start["0.weight"])


def test_same_seed_same_head_and_fedprox_stays_closer(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = digits[0][:300], digits[1][:300]
    start = init_head(LINEAR)
    a = train_head(LINEAR, start, x, y, TrainConfig(seed=4))
    b = train_head(LINEAR, start, x, y, TrainConfig(seed=4))
    c = train_head(LINEAR, start, x, y, TrainConfig(seed=5))
    np.testing.assert_array_equal(a.weights["0.weight"], b.weights["0.weight"])
    assert not np.array_equal(a.weights["0.weight"], c.weights["0.weight"])
    prox = train_head(LINEAR, start, x, y, TrainConfig(seed=4, proximal_mu=5.0))

    def drift(result: object) -> float:
        return float(np.linalg.norm(result.weights["0.weight"] - start["0.weight"]))  # type: ignore[attr-defined]

    assert drift(prox) < 0.8 * drift(a)


@pytest.mark.parametrize(
    ("layers", "features", "labels", "message"),
    [
        (LINEAR, np.zeros((3, 63)), np.zeros(3, int), "expected \\[n, 64\\]"),
        (LINEAR, np.zeros((3, 64)), np.array([0, 1, 10]), "labels must be in \\[0, 10\\)"),
        (LINEAR, np.zeros((3, 64)), np.zeros(2, int), "labels have shape"),
        (LINEAR, np.zeros((3, 64)), np.zeros(3), "integers"),
        (LINEAR, np.zeros((0, 64)), np.zeros(0, int), "zero samples"),
        ([{"kind": "conv"}], np.zeros((3, 64)), np.zeros(3, int), "unsupported kind 'conv'"),
    ],
)
def test_bad_input_raises_a_clear_error(
    layers: list, features: np.ndarray, labels: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        train_head(layers, init_head(LINEAR), features, labels, TrainConfig())


def test_bad_config_and_backend_are_refused() -> None:
    x, y = np.zeros((2, 64), np.float32), np.zeros(2, int)
    with pytest.raises(ValueError, match="lr must be > 0"):
        train_head(LINEAR, init_head(LINEAR), x, y, TrainConfig(lr=0.0))
    with pytest.raises(ValueError, match="unknown training backend 'jax'"):
        train_head(LINEAR, init_head(LINEAR), x, y, TrainConfig(), backend="jax")
    with pytest.raises(ValueError, match="global weights"):
        head_gradients(LINEAR, init_head(LINEAR), x, y, proximal_mu=0.1)


def test_config_from_a_task_message_is_checked() -> None:
    config = TrainConfig.from_dict({"epochs": 2, "lr": 0.05, "proximal_mu": 0, "batch_size": 8.0})
    assert config == TrainConfig(epochs=2, lr=0.05, batch_size=8, proximal_mu=0.0)
    assert isinstance(config.batch_size, int) and isinstance(config.proximal_mu, float)
    with pytest.raises(ValueError, match="unknown training settings \\['momentum'\\]"):
        TrainConfig.from_dict({"momentum": 0.9})
    with pytest.raises(ValueError, match="epochs must be an integer"):
        TrainConfig.from_dict({"epochs": 1.5})
    with pytest.raises(ValueError, match="lr must be a number"):
        TrainConfig.from_dict({"lr": "fast"})
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        TrainConfig.from_dict({"batch_size": 0})
