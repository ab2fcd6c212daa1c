"""Datasets: built-in digits, the FL-digits split, .npz, ImageFolder, preprocessing."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgefl.bundle import Preprocess
from edgefl.data import (
    Dataset,
    apply_preprocess,
    conform,
    fl_digits_split,
    holdout_split,
    iter_batches,
    load_dataset,
    open_source,
)
from edgefl.errors import DataError


def test_digits_are_scaled_images_with_ten_labels() -> None:
    digits = load_dataset("digits")
    assert digits.X.shape == (1797, 1, 8, 8)
    assert digits.X.dtype == np.float32 and digits.y.dtype == np.int64
    assert digits.X.min() >= 0.0 and digits.X.max() == 1.0
    assert digits.labels == [str(i) for i in range(10)]


def test_fl_digits_split_matches_the_design_sizes_and_is_deterministic() -> None:
    (Xc, yc), (_, yp), (Xt, yt) = fl_digits_split()
    assert (len(yc), len(yp), len(yt)) == (539, 880, 378)
    assert Xc.shape[1] == 64 and Xc.dtype == np.float32
    again = fl_digits_split()
    assert np.array_equal(again[2][0], Xt) and np.array_equal(again[1][1], yp)
    # Stratified: every class is in every part in nearly the same share.
    for part in (yc, yp, yt):
        shares = np.bincount(part, minlength=10) / len(part)
        assert shares.min() > 0.08 and shares.max() < 0.12


def test_holdout_split_is_stratified_disjoint_and_deterministic() -> None:
    data = Dataset(np.arange(40, dtype=np.float32)[:, None], np.repeat([0, 1], 20), ["a", "b"])
    train, test = holdout_split(data, 0.25, seed=3)
    assert len(train) == 30 and len(test) == 10
    assert np.bincount(test.y).tolist() == [5, 5]
    assert not set(train.X[:, 0]) & set(test.X[:, 0])
    assert np.array_equal(holdout_split(data, 0.25, seed=3)[1].X, test.X)


def test_npz_loads_and_reports_missing_arrays(tmp_path: Path) -> None:
    good = tmp_path / "good.npz"
    np.savez(good, X=np.ones((5, 3), np.float32), y=np.array([0, 1, 2, 1, 0]))
    data = load_dataset(good)
    assert data.X.shape == (5, 3) and data.labels == ["0", "1", "2"]
    bad = tmp_path / "bad.npz"
    np.savez(bad, X=np.ones((5, 3), np.float32))
    with pytest.raises(DataError, match="no array y"):
        load_dataset(bad)
    mismatch = tmp_path / "mismatch.npz"
    np.savez(mismatch, X=np.ones((5, 3), np.float32), y=np.array([0, 1]))
    with pytest.raises(DataError, match="one label per sample"):
        load_dataset(mismatch)
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "missing.npz")


def test_nan_or_inf_samples_are_refused_with_the_count_and_first_index(tmp_path: Path) -> None:
    X = np.ones((6, 2, 2), np.float32)
    X[2, 1, 0] = np.nan
    X[4, 0, 1] = np.inf
    X[5, 0, 0] = -np.inf
    path = tmp_path / "bad-values.npz"
    np.savez(path, X=X, y=np.array([0, 1, 0, 1, 0, 1]))
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert str(info.value) == (
        f"{path}: 3 of 6 samples hold NaN or Inf values (first: sample 2); clean or drop them"
    )


def test_image_folder_is_preprocessed_as_the_manifest_says(tmp_path: Path) -> None:
    for label, value in (("cat", 255), ("dog", 0)):
        (tmp_path / label).mkdir()
        for i in range(3):
            image = np.full((6, 10, 3), value, dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / label / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    preprocess = Preprocess(scale=1 / 255, mean=[0.5], std=[0.5], resize=[4, 4], grayscale=True)
    data = load_dataset(tmp_path, preprocess)
    assert data.labels == ["cat", "dog"]
    assert data.X.shape == (6, 1, 4, 4)
    assert np.allclose(data.X[data.y == 0], 1.0, atol=1e-3)
    assert np.allclose(data.X[data.y == 1], -1.0, atol=1e-3)


def test_empty_image_folders_are_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no class subfolders"):
        load_dataset(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_dataset(tmp_path)


def test_apply_preprocess_normalises_per_channel_into_nchw() -> None:
    image = np.array([[[255, 0, 51], [0, 255, 51]]], dtype=np.uint8)  # 1x2 RGB
    out = apply_preprocess(
        [image], Preprocess(scale=1 / 255, mean=[0.5, 0.5, 0.0], std=[0.5, 0.5, 0.2])
    )
    assert out.shape == (1, 3, 1, 2)
    assert np.allclose(out[0, :, 0, 0], [1.0, -1.0, 1.0])
    assert np.allclose(out[0, :, 0, 1], [-1.0, 1.0, 1.0])
    with pytest.raises(DataError, match="mean has 2 values"):
        apply_preprocess([image], Preprocess(mean=[0.1, 0.2]))


def test_conform_reshapes_same_size_and_rejects_other_shapes() -> None:
    data = Dataset(np.zeros((2, 1, 8, 8), np.float32), np.array([0, 1]), ["0", "1"])
    assert conform(data, [64]).X.shape == (2, 64)
    with pytest.raises(DataError, match=r"shape \[1, 8, 8\] but the model takes \[3, 224, 224\]"):
        conform(data, [3, 224, 224])


def test_data_module_imports_without_torch_or_sklearn() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['sklearn'] = None; "
        "import edgefl.data; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_npz_samples_stream_in_batches_and_load_without_a_second_copy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((203, 3, 32, 32), dtype=np.float32)  # 2.5 MB
    path = tmp_path / "data.npz"
    np.savez(path, X=X, y=np.arange(203) % 7)
    source = open_source(path)
    assert (len(source), source.labels) == (203, [str(i) for i in range(7)])

    tracemalloc.start()
    try:
        sizes = [len(batch) for batch in iter_batches(path, None, 10)]
        _, streamed_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        loaded = load_dataset(path)
        _, loaded_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sizes == [10] * 20 + [3]
    assert streamed_peak < 0.25 * X.nbytes  # a few batches of 10 at most, never all 203
    assert loaded_peak < 1.5 * X.nbytes  # one float32 copy, not two
    np.testing.assert_array_equal(loaded.X, X)
    np.testing.assert_array_equal(np.concatenate(list(source.batches(None, 64))), X)

    uint8 = tmp_path / "uint8.npz"
    np.savez(uint8, X=np.full((5, 4, 4), 255, np.uint8), y=np.zeros(5, np.int64))
    (batch,) = iter_batches(uint8, Preprocess(scale=1 / 255), 8)
    assert batch.dtype == np.float32 and np.allclose(batch, 1.0)


def test_image_folder_batches_match_the_loaded_dataset_and_digest_tracks_the_files(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(1)
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(4):
            image = rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / label / f"{i}.png")
    preprocess = Preprocess(scale=1 / 255, mean=[0.4, 0.5, 0.6], std=[0.2], resize=[8, 8])
    source = open_source(tmp_path)
    assert list(source.y) == [0, 0, 0, 0, 1, 1, 1, 1] and source.labels == ["a", "b"]
    batches = list(source.batches(preprocess, 3))
    assert [b.shape for b in batches] == [(3, 3, 8, 8), (3, 3, 8, 8), (2, 3, 8, 8)]
    np.testing.assert_array_equal(np.concatenate(batches), load_dataset(tmp_path, preprocess).X)

    digest = source.digest(preprocess)
    assert source.digest(preprocess) == digest != source.digest(None)
    Image.fromarray(np.zeros((12, 9, 3), np.uint8)).save(tmp_path / "b" / "3.png")
    assert source.digest(preprocess) != digest
    with pytest.raises(DataError, match="built-in digits"):
        open_source("digits")
