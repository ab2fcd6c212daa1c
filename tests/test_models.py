"""Models in: built-ins, factories and weights, errors, the backbone + head split, transfer."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_models
import torch
from safetensors.torch import save_file
from torch import nn

from edgefl.compression.distill import accuracy, predict
from edgefl.compression.transfer import parse_finetune, replace_head, train_head
from edgefl.data import Dataset, fl_digits_split, holdout_split, load_digits
from edgefl.errors import EdgeflError, ModelLoadError
from edgefl.head import head_forward
from edgefl.models import load_model, resolve_model, split_model
from edgefl.models.builtin import DIGITS_CNN_CACHE

torch.set_num_threads(1)

FACTORY_MODULE = """
from torch import nn

import tiny_models

def make():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

class Bottleneck(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.classifier = nn.Sequential(
            nn.Dropout(0.1), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)
        )

    def forward(self, x):
        return self.classifier(self.body(x))

def bottleneck():
    return Bottleneck()

def broken():
    raise ValueError("no GPU here")

def not_a_model():
    return 42
"""


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"edgefl_test_factory_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text(FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_digits_cnn_is_pretrained_on_the_train_split_and_scores_well() -> None:
    model = load_model("digits-cnn")
    _, test = holdout_split(load_digits())
    assert accuracy(model, test.X, test.y) >= 0.95


@pytest.mark.slow
def test_digits_cnn_training_is_cached_and_deterministic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFL_CACHE", str(tmp_path))
    first = load_model("digits-cnn")
    assert (tmp_path / DIGITS_CNN_CACHE).is_file()
    second = load_model("digits-cnn")
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key])
    # Training is seeded: a fresh cache gives the same model as the default one, up to float
    # summation order (thread count), so the same predictions.
    monkeypatch.delenv("EDGEFL_CACHE")
    default = load_model("digits-cnn")
    x = torch.from_numpy(load_digits().X[:200])
    agree = (first(x).argmax(1) == default(x).argmax(1)).float().mean()
    assert agree >= 0.99


def test_digits_mlp_is_the_fl_digits_backbone() -> None:
    model = resolve_model("digits-mlp")
    assert model.input_shape == [64] and model.head == "head"
    _, _, (X, y) = fl_digits_split()
    assert accuracy(model.module, X, y) > 0.85
    sizes = [
        (m.in_features, m.out_features) for m in model.module.modules() if isinstance(m, nn.Linear)
    ]
    assert sizes == [(64, 128), (128, 64), (64, 10)]


@pytest.mark.parametrize(
    ("name", "params", "head"),
    [("resnet18", 11_689_512, "fc"), ("mobilenet-v2", 3_504_872, "classifier.1")],
)
def test_imagenet_builtins_have_the_standard_sizes(name: str, params: int, head: str) -> None:
    loaded = resolve_model(name)
    assert sum(p.numel() for p in loaded.module.parameters()) == params
    assert loaded.input_shape == [3, 224, 224] and loaded.head == head
    # No weights shipped: compress warns that this model is random (tests/test_cli_compress.py).
    assert loaded.random_init
    split = split_model(loaded.module, None, torch.zeros(1, 3, 64, 64))
    assert split.head_layers()[-1] == {"kind": "linear", "in": split.feature_size, "out": 1000}


def test_only_builtins_without_weights_or_pretraining_are_random(
    factory_module: str, tmp_path: Path
) -> None:
    assert not resolve_model("digits-mlp").random_init  # pretrained on first use
    assert not resolve_model(f"{factory_module}:make").random_init  # the user's own model
    digits_cnn = resolve_model("digits-cnn")
    save_file(digits_cnn.module.state_dict(), tmp_path / "cnn.safetensors")
    assert not resolve_model("digits-cnn", tmp_path / "cnn.safetensors").random_init


def test_factory_with_safetensors_and_pt_weights(factory_module: str, tmp_path: Path) -> None:
    source = load_model(f"{factory_module}:make")
    state = {k: torch.randn_like(v) for k, v in source.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "w.pt")
    x = torch.randn(2, 4)
    a = load_model(f"{factory_module}:make", tmp_path / "w.safetensors")(x)
    b = load_model(f"{factory_module}:make", tmp_path / "w.pt")(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, source(x))


def test_load_errors_name_the_problem(factory_module: str, tmp_path: Path) -> None:
    cases = [
        (("no-such-model", None), "unknown model 'no-such-model'"),
        (
            ("edgefl_missing_pkg.models:make", None),
            "cannot import module 'edgefl_missing_pkg.models'",
        ),
        ((f"{factory_module}:nope", None), "has no 'nope'"),
        ((f"{factory_module}:broken", None), "failed: ValueError: no GPU here"),
        ((f"{factory_module}:not_a_model", None), "returned int, not a torch nn.Module"),
        ((f"{factory_module}:make", tmp_path / "missing.pt"), "not found"),
    ]
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00garbage" * 10)
    cases.append(((f"{factory_module}:make", tmp_path / "corrupt.safetensors"), "corrupt"))
    save_file({"other.weight": torch.zeros(1)}, tmp_path / "keys.safetensors")
    cases.append(((f"{factory_module}:make", tmp_path / "keys.safetensors"), "missing keys 0.bias"))
    wrong = {
        k: torch.zeros(v.shape[0] + 1, *v.shape[1:])
        for k, v in load_model(f"{factory_module}:make").state_dict().items()
    }
    save_file(wrong, tmp_path / "shape.safetensors")
    cases.append(((f"{factory_module}:make", tmp_path / "shape.safetensors"), "has shape"))
    for (spec, weights), message in cases:
        with pytest.raises(ModelLoadError, match=message):
            load_model(spec, weights)


def test_split_is_faithful_and_finds_the_last_linear() -> None:
    model = load_model("digits-cnn")
    x = torch.from_numpy(load_digits().X[:8])
    split = split_model(model, None, x)
    assert split.head_layers() == [{"kind": "linear", "in": 64, "out": 10}]
    assert split.backbone(x).shape == (8, 64)
    assert torch.allclose(split(x), model(x))
    assert isinstance(model.fc, nn.Linear)  # the original keeps its head
    weights = split.head_weights()
    assert set(weights) == {"0.weight", "0.bias"} and weights["0.weight"].shape == (10, 64)


def test_named_sequential_head_keeps_its_bottleneck(factory_module: str) -> None:
    model = load_model(f"{factory_module}:bottleneck")
    x = torch.randn(5, 4)
    split = split_model(model, "classifier", x)
    assert split.head_layers() == [
        {"kind": "linear", "in": 8, "out": 6},
        {"kind": "relu"},
        {"kind": "linear", "in": 6, "out": 3},
    ]
    assert torch.allclose(split(x), model(x))
    with pytest.raises(ModelLoadError, match="no module 'classifer'"):
        split_model(model, "classifer", x)
    with pytest.raises(ModelLoadError, match="holds Conv2d; a head may only hold Linear, ReLU"):
        split_model(load_model("digits-cnn"), "features", torch.zeros(1, 1, 8, 8))


class _SigmoidAfterHead(nn.Module):
    """A pitch-tracker-like model: its forward applies a sigmoid after the last Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(self.body(x))) * 2.0


def test_a_sigmoid_and_scaling_after_the_head_become_its_output_operations() -> None:
    torch.manual_seed(0)
    x = torch.from_numpy(load_digits().X[:16])
    model = _SigmoidAfterHead().eval()
    split = split_model(model, None, x[:2], x)
    spec = split.head_spec([str(i) for i in range(10)])
    assert spec.layers == [{"kind": "linear", "in": 16, "out": 10}]
    assert spec.outputs == [{"op": "sigmoid"}, {"op": "affine", "scale": 2.0, "shift": 0.0}]
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(split.model_outputs(x), expected)
        features = split.backbone(x).numpy()
    # A board computes the same in numpy from the manifest's spec and the head's weights.
    got = head_forward(spec.layers, split.head_weights(), features, spec.outputs)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-6)
    # Logits (what training and argmax use) keep the model's predicted classes.
    assert torch.equal(split(x).argmax(1), expected.argmax(1))


class _CumsumAfterHead(_SigmoidAfterHead):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x)).cumsum(1)


def test_an_operation_that_mixes_outputs_after_the_head_is_refused_by_name() -> None:
    x = torch.from_numpy(load_digits().X[:16])
    with pytest.raises(ModelLoadError) as info:
        split_model(_CumsumAfterHead().eval(), None, x[:2], x)
    assert str(info.value).startswith(
        "the model's forward applies cumsum after head 'fc'; after its last Linear a head may "
        "only apply sigmoid, tanh, softmax, log_softmax and scaling by a positive number"
    )


def test_a_crepe_like_forward_with_an_embed_switch_splits_with_its_sigmoid() -> None:
    model = tiny_models.pitch_like()
    x = torch.from_numpy(load_digits().X[:64])
    split = split_model(model, None, x[:2], x)
    assert split.output_ops == [{"op": "sigmoid"}]
    # The backbone stops at the head's input: the sigmoid is not applied to the features.
    with torch.no_grad():
        assert torch.allclose(split.backbone(x), model(x, embed=True))
        assert torch.allclose(split.model_outputs(x), model(x))


class _DataDependent(_SigmoidAfterHead):
    """A forward torch.fx cannot trace: control flow on the data."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc(self.body(x))
        return logits.sigmoid() if float(x.sum()) > 0 else logits


def test_an_untraceable_forward_that_changes_the_head_output_is_refused() -> None:
    x = torch.from_numpy(load_digits().X[:16])
    with pytest.raises(ModelLoadError, match=r"changes its outputs \(max error .* on 16 samples\)"):
        split_model(_DataDependent().eval(), None, x[:2], x)


def test_a_named_head_may_end_with_softmax() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10), nn.Softmax(dim=1)
    ).eval()
    x = torch.from_numpy(load_digits().X[:8])
    split = split_model(model, "3", x)
    assert split.output_ops == [{"op": "softmax"}]
    named = nn.Sequential()
    named.add_module("body", nn.Sequential(nn.Flatten(), nn.Linear(64, 16)))
    named.add_module(
        "classifier", nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 10), nn.Sigmoid())
    )
    split = split_model(named.eval(), "classifier", x)
    assert [layer["kind"] for layer in split.head_layers()] == ["linear", "relu", "linear"]
    assert split.output_ops == [{"op": "sigmoid"}]
    assert torch.allclose(split.model_outputs(x), named(x))


def test_a_head_may_start_with_flatten_which_stays_in_the_backbone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module(
        "features", nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    )
    model.add_module(
        "classifier", nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 10))
    )
    x = torch.from_numpy(load_digits().X[:8])
    split = split_model(model.eval(), "classifier", x)
    assert [layer["kind"] for layer in split.head_layers()] == ["linear", "relu", "linear"]
    assert split.backbone(x).shape == (8, 4)
    assert torch.allclose(split(x), model(x))


def test_wrong_input_shape_is_a_load_error() -> None:
    with pytest.raises(ModelLoadError, match=r"does not accept inputs of shape \[64\]"):
        split_model(load_model("digits-cnn"), None, torch.zeros(2, 64))


class _Silent(nn.Module):
    """A backbone that rejects its input with a RuntimeError without a message."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError()


def test_input_rejected_without_a_message_is_still_a_load_error() -> None:
    # An empty message once crashed the split with an IndexError instead.
    with pytest.raises(
        ModelLoadError, match=r"does not accept inputs of shape \[4\]: RuntimeError"
    ):
        split_model(_Silent(), "fc", torch.zeros(1, 4))


def test_new_head_trains_on_frozen_backbone() -> None:
    model = load_model("digits-mlp")
    (X, y), _, (Xt, yt) = fl_digits_split()
    keep, keep_t = y < 3, yt < 3
    train = Dataset(X[keep], y[keep], ["0", "1", "2"])
    split = split_model(model, None, torch.from_numpy(X[:2]))
    backbone_before = {k: v.clone() for k, v in split.backbone.state_dict().items()}
    replace_head(split, 3)
    assert split.head_layers() == [{"kind": "linear", "in": 64, "out": 3}]
    train_head(split, train, epochs=15, lr=0.01)
    assert accuracy(split, Xt[keep_t], yt[keep_t]) > 0.95
    for key, value in split.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[key])


def test_finetune_last_block_changes_only_that_block() -> None:
    model = load_model("digits-mlp")
    (X, y), _, _ = fl_digits_split()
    split = split_model(model, None, torch.from_numpy(X[:2]))
    before = {k: v.clone() for k, v in split.backbone.state_dict().items()}
    train_head(
        split, Dataset(X, y, [str(i) for i in range(10)]), finetune=parse_finetune("1"), epochs=1
    )
    after = split.backbone.state_dict()
    assert torch.equal(after["backbone.0.weight"], before["backbone.0.weight"])
    assert not torch.equal(after["backbone.2.weight"], before["backbone.2.weight"])
    features = predict(split.backbone, X[:4])
    assert features.shape == (4, 64) and np.isfinite(features).all()
    with pytest.raises(EdgeflError, match="'all' or a positive number"):
        parse_finetune("last")
    with pytest.raises(EdgeflError, match="has 10 outputs; give `num_classes`"):
        train_head(split, Dataset(X[:3], np.array([0, 1, 12]), []), epochs=1)


def test_imagenet_builtins_record_their_standard_preprocessing() -> None:
    from edgefl.models.builtin import find_builtin

    for name in ("resnet18", "mobilenet-v2"):
        builtin = find_builtin(name)
        assert builtin is not None and builtin.input_shape == [3, 224, 224]
        preprocess = builtin.preprocess
        assert preprocess.resize == [224, 224] and not preprocess.grayscale
        assert preprocess.scale == pytest.approx(1 / 255) and preprocess.layout == "NCHW"
        assert preprocess.mean == [0.485, 0.456, 0.406]
        assert preprocess.std == [0.229, 0.224, 0.225]


def test_a_factory_module_that_fails_on_import_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"edgefl_test_broken_{tmp_path.name}"
    (tmp_path / f"{name}.py").write_text("raise KeyError('MODEL_HOME')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelLoadError) as caught:
        load_model(f"{name}:make")
    assert str(caught.value) == (
        f"importing module '{name}' of model '{name}:make' failed: KeyError: 'MODEL_HOME'"
    )
