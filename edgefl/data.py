"""Datasets as numpy arrays: built-in digits, `.npz` files and ImageFolder directories.

Boards import this module, so it needs neither torch nor scikit-learn at import time: sklearn is
imported only when the built-in digits are asked for, Pillow only when images are decoded.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from edgefl.bundle import Preprocess
from edgefl.errors import DataError

DIGITS = "digits"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# The digits come as 0..16 intensities on an 8x8 grid; X/16 is the scaling DESIGN.md fixes.
DIGITS_PREPROCESS = Preprocess(scale=1.0 / 16.0, resize=[8, 8], grayscale=True, layout="NCHW")
# The same inputs from 8-bit images (0..255): what a board with a camera applies for digits models.
DIGITS_IMAGE_PREPROCESS = Preprocess(scale=1.0 / 255.0, resize=[8, 8], grayscale=True)
DEFAULT_IMAGE_PREPROCESS = Preprocess(scale=1.0 / 255.0)

Split = tuple[np.ndarray, np.ndarray]


@dataclass
class Dataset:
    """Labelled samples: `X` float32 model inputs, `y` int64 class indices into `labels`."""

    X: np.ndarray
    y: np.ndarray
    labels: list[str]

    def __post_init__(self) -> None:
        self.X = np.asarray(self.X, dtype=np.float32)
        self.y = np.asarray(self.y, dtype=np.int64)
        if len(self.X) != len(self.y):
            raise DataError(f"X has {len(self.X)} samples but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample (without the batch dimension)."""
        return tuple(int(d) for d in self.X.shape[1:])

    def subset(self, indices: np.ndarray) -> Dataset:
        """Return the samples at `indices`, with the same labels."""
        return Dataset(self.X[indices], self.y[indices], list(self.labels))


def load_dataset(source: str | Path, preprocess: Preprocess | None = None) -> Dataset:
    """Load a dataset from the built-in name `digits`, an `.npz` file or an ImageFolder directory.

    Args:
        source: "digits"; a `.npz` with arrays `X` (samples) and `y` (integer labels), and
            optionally `labels` (class names); or a directory with one subfolder of images per
            class (the subfolder names, sorted, are the labels).
        preprocess: how images become model inputs (ImageFolder only; `.npz` arrays of uint8
            images are preprocessed too, float arrays are taken as model inputs already).
            Digits always use `DIGITS_PREPROCESS`, shaped (n, 1, 8, 8).

    Returns:
        The dataset.

    Raises:
        DataError: the source does not exist, is empty, or its arrays are missing or inconsistent.
    """
    if str(source) == DIGITS:
        return load_digits()
    path = Path(source)
    if not path.exists():
        raise DataError(f"data source {source} not found (expected 'digits', a .npz or a folder)")
    if path.is_dir():
        return check_finite(_load_image_folder(path, preprocess or DEFAULT_IMAGE_PREPROCESS), path)
    if path.suffix == ".npz":
        return check_finite(_load_npz(path, preprocess), path)
    raise DataError(f"data source {source} is neither a .npz file nor an image folder")


def check_finite(dataset: Dataset, source: str | Path) -> Dataset:
    """Return `dataset`, or raise DataError naming how many samples hold NaN/Inf and the first.

    NaN inputs give NaN outputs, which no comparison catches (`NaN > tol` is False).
    """
    bad = ~np.isfinite(dataset.X.reshape(len(dataset), -1)).all(axis=1)
    if bad.any():
        raise DataError(
            f"{source}: {int(bad.sum())} of {len(dataset)} samples hold NaN or Inf values "
            f"(first: sample {int(np.flatnonzero(bad)[0])}); clean or drop them"
        )
    return dataset


@dataclass(frozen=True)
class DataSource:
    """Labelled samples on disk (a `.npz` or an ImageFolder), read in batches when needed.

    Labels and count are read up front, samples only by `batches()`: a board keeps just their
    features (224x224 inputs are 0.6 MB each; holding them all broke its memory budget).

    Attributes:
        path: the `.npz` file or the ImageFolder directory.
        y: int64 class index of every sample, in reading order.
        labels: class names.
        files: ImageFolder only: the image file of every sample; empty for a `.npz`.
    """

    path: Path
    y: np.ndarray
    labels: list[str]
    files: tuple[Path, ...] = ()

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, preprocess: Preprocess | None, batch_size: int) -> Iterator[np.ndarray]:
        """Yield the samples as float32 model inputs, at most `batch_size` at a time.

        Args:
            preprocess: as for `load_dataset`: applied to images and to integer `.npz` arrays;
                None takes `DEFAULT_IMAGE_PREPROCESS` for images and float arrays as they are.
            batch_size: samples per batch (at least 1).

        Raises:
            DataError: a sample cannot be read or preprocessed.
        """
        batch_size = max(1, int(batch_size))
        if self.files:
            image_preprocess = preprocess or DEFAULT_IMAGE_PREPROCESS
            for start in range(0, len(self.files), batch_size):
                chunk = self.files[start : start + batch_size]
                images = [_read_image(f, image_preprocess.grayscale) for f in chunk]
                yield apply_preprocess(images, image_preprocess)
            return
        for batch in _npz_rows(self.path, batch_size):
            if np.issubdtype(batch.dtype, np.integer) and preprocess is not None:
                batch = apply_preprocess(batch, preprocess)
            yield np.ascontiguousarray(batch, dtype=np.float32)

    def digest(self, preprocess: Preprocess | None = None) -> str:
        """Return a short hex digest of the sample files' bytes and the preprocessing: a feature
        cache key made without decoding any image (other preprocessing, other inputs)."""
        digest = hashlib.sha256(json.dumps(asdict(preprocess)).encode() if preprocess else b"-")
        for file in self.files or (self.path,):
            digest.update(str(file.relative_to(self.path.parent)).encode() + b"\0")
            hash_file(digest, file)
        return digest.hexdigest()[:16]


def hash_file(digest: Any, file: Path) -> None:
    """Stream `file`'s bytes into `digest` (a hashlib object); DataError if it is unreadable."""
    try:
        with file.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    except OSError as exc:
        raise DataError(f"cannot read {file}: {exc}") from exc


def open_source(source: str | Path) -> DataSource:
    """Open a `.npz` file or an ImageFolder directory for reading in batches.

    Reads the labels and checks them as `load_dataset` does, but not the samples.

    Raises:
        DataError: the source is "digits" (in memory: use `load_dataset`), does not exist, is
            empty, or its arrays are missing or inconsistent.
    """
    if str(source) == DIGITS:
        raise DataError("the built-in digits are loaded with load_dataset, not read from disk")
    path = Path(source)
    if not path.exists():
        raise DataError(f"data source {source} not found (expected 'digits', a .npz or a folder)")
    if path.is_dir():
        return _open_image_folder(path)
    if path.suffix == ".npz":
        return _open_npz(path)
    raise DataError(f"data source {source} is neither a .npz file nor an image folder")


def iter_batches(
    source: str | Path, preprocess: Preprocess | None, batch_size: int
) -> Iterator[np.ndarray]:
    """Yield the samples of a `.npz` or ImageFolder as float32 model inputs, in batches.

    Never holds more than one batch of samples; see `DataSource.batches`.

    Raises:
        DataError: as `open_source`, or a sample cannot be read.
    """
    return open_source(source).batches(preprocess, batch_size)


def source_preprocess(source: str | Path, model_preprocess: Preprocess | None) -> Preprocess:
    """Return the preprocessing that turns raw samples of `source` into model inputs.

    The built-in digits are 0..16 intensities (`DIGITS_PREPROCESS`); images and `.npz` files
    take the model's preprocessing, else `DEFAULT_IMAGE_PREPROCESS`. This is what a bundle
    records, so boards preprocess their samples the same way.
    """
    if str(source) == DIGITS:
        return DIGITS_PREPROCESS
    return model_preprocess or DEFAULT_IMAGE_PREPROCESS


def load_digits() -> Dataset:
    """Return scikit-learn's bundled digits as (1797, 1, 8, 8) float32 in [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    X = (bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return Dataset(X, bunch.target.astype(np.int64), [str(i) for i in range(10)])


def fl_digits_split() -> tuple[Split, Split, Split]:
    """Return the FL-digits split of DESIGN.md: (central, pool, test), each (X, y), X flat (n, 64).

    Stratified with random_state=0: 30% central pretraining set; the other 70% split 70/30 into
    the federated pool and the test set. Uses scikit-learn's splitter so the numbers match the
    Flower baseline exactly.
    """
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = digits.X.reshape(len(digits), -1)
    y = digits.y
    X_central, X_rest, y_central, y_rest = train_test_split(
        X, y, train_size=0.3, stratify=y, random_state=0
    )
    X_pool, X_test, y_pool, y_test = train_test_split(
        X_rest, y_rest, test_size=0.3, stratify=y_rest, random_state=0
    )
    return (X_central, y_central), (X_pool, y_pool), (X_test, y_test)


def holdout_split(
    dataset: Dataset, test_fraction: float = 0.2, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """Split a dataset into (train, test), stratified by label, deterministic for a seed.

    Every class with at least two samples puts at least one in each part.

    Raises:
        DataError: the dataset has fewer than two samples.
    """
    if len(dataset) < 2:
        raise DataError(f"need at least 2 samples to hold some out, got {len(dataset)}")
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    train: list[np.ndarray] = []
    for label in np.unique(dataset.y):
        members = rng.permutation(np.flatnonzero(dataset.y == label))
        n_test = round(len(members) * test_fraction)
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return (
        dataset.subset(np.sort(np.concatenate(train))),
        dataset.subset(np.sort(np.concatenate(test))),
    )


def conform(dataset: Dataset, input_shape: Sequence[int]) -> Dataset:
    """Return the dataset with samples shaped like the model input.

    Samples with the same number of values are reshaped (digits are (1, 8, 8) for a CNN and 64
    values flat for an MLP); anything else is an error.

    Raises:
        DataError: the samples do not fit the model input.
    """
    X = conform_batch(dataset.X, input_shape)
    return dataset if X is dataset.X else Dataset(X, dataset.y, dataset.labels)


def conform_batch(x: np.ndarray, input_shape: Sequence[int]) -> np.ndarray:
    """Return a batch `x` (n, ...) reshaped to (n, *input_shape); `x` itself when it fits.

    Raises:
        DataError: the samples hold a different number of values than the model input.
    """
    shape = tuple(int(d) for d in input_shape)
    sample_shape = tuple(int(d) for d in x.shape[1:])
    if sample_shape == shape:
        return x
    if int(np.prod(sample_shape)) != int(np.prod(shape)):
        raise DataError(
            f"data samples have shape {list(sample_shape)} but the model takes "
            f"{list(shape)}; resize the data or pass a matching model"
        )
    return x.reshape((len(x), *shape))


def apply_preprocess(
    images: np.ndarray | Sequence[np.ndarray], preprocess: Preprocess
) -> np.ndarray:
    """Turn raw images into backbone inputs exactly as the manifest says.

    Args:
        images: a batch (n, H, W) or (n, H, W, C) of pixel values (any dtype), or a list of such
            images with different sizes (they are resized first).
        preprocess: the manifest's preprocessing.

    Returns:
        float32 array (n, C, H, W) for layout "NCHW", (n, H, W, C) for "NHWC".

    Raises:
        DataError: images of different sizes without `resize`, or a channel count that does not
            match `mean`/`std`.
    """
    batch = [np.asarray(image) for image in images]
    if preprocess.grayscale:
        batch = [_to_gray(image) for image in batch]
    if preprocess.resize is not None:
        height, width = preprocess.resize
        batch = [_resize(image, height, width) for image in batch]
    shapes = sorted({image.shape for image in batch})
    if len(shapes) > 1:
        raise DataError(_different_sizes(shapes[0], shapes[-1]))
    x = np.stack([image if image.ndim == 3 else image[..., None] for image in batch])
    x = x.astype(np.float32) * np.float32(preprocess.scale)
    channels = x.shape[-1]
    for name, values in (("mean", preprocess.mean), ("std", preprocess.std)):
        if values is not None and len(values) not in (1, channels):
            raise DataError(f"preprocess {name} has {len(values)} values for {channels} channels")
    if preprocess.mean is not None:
        x = x - np.asarray(preprocess.mean, dtype=np.float32)
    if preprocess.std is not None:
        x = x / np.asarray(preprocess.std, dtype=np.float32)
    if preprocess.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.float32)


def _different_sizes(first: tuple[int, ...], second: tuple[int, ...]) -> str:
    sizes = " and ".join(f"{shape[0]}x{shape[1]}" for shape in (first, second))
    return (
        f"images have different sizes ({sizes}); set a resize in the preprocessing (`resize` HxW)"
    )


def _to_gray(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image
    if image.shape[-1] == 1:
        return image[..., 0]
    # ITU-R 601 luma, the weights Pillow's "L" conversion uses.
    rgb = image[..., :3].astype(np.float32)
    return rgb @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    from PIL import Image

    channels = [image] if image.ndim == 2 else [image[..., c] for c in range(image.shape[-1])]
    # Resize each channel as a float image so no precision is lost to uint8 rounding.
    resized = [
        np.asarray(
            Image.fromarray(c.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR)
        )
        for c in channels
    ]
    return resized[0] if image.ndim == 2 else np.stack(resized, axis=-1)


def _load_npz(path: Path, preprocess: Preprocess | None) -> Dataset:
    source = _open_npz(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            X = archive["X"]
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable .npz file: {exc}") from exc
    if np.issubdtype(X.dtype, np.integer) and preprocess is not None:
        X = apply_preprocess(X, preprocess)
    # copy=False: a float32 archive is used as loaded, not held twice while it is converted.
    return Dataset(X.astype(np.float32, copy=False), source.y, source.labels)


def _open_npz(path: Path) -> DataSource:
    """Read a `.npz`'s labels and the shape of X, checking them, without reading X."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = set(archive.files)
            missing = [name for name in ("X", "y") if name not in names]
            if missing:
                raise DataError(
                    f"{path} has no array {' or '.join(missing)} (found: {sorted(names)})"
                )
            y = archive["y"]
            labels = [str(v) for v in archive["labels"]] if "labels" in names else []
        with zipfile.ZipFile(path) as archive, archive.open("X.npy") as stream:
            x_shape, _ = _npy_header(stream)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a readable .npz file: {exc}") from exc
    if len(x_shape) == 0 or x_shape[0] == 0:
        raise DataError(f"{path} holds no samples")
    if y.ndim != 1 or len(y) != x_shape[0]:
        raise DataError(f"{path}: y must be 1-D with one label per sample of X")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: y must hold integer class indices, not {y.dtype}")
    n_classes = int(y.max()) + 1
    labels = labels or [str(i) for i in range(n_classes)]
    if len(labels) < n_classes:
        raise DataError(f"{path}: y has class {n_classes - 1} but only {len(labels)} labels")
    return DataSource(path, y.astype(np.int64), labels)


def _npy_header(stream: IO[bytes]) -> tuple[tuple[int, ...], np.dtype | None]:
    """Read a `.npy` header: (shape, dtype), dtype None when rows cannot be streamed.

    Fortran order, object arrays and header versions other than 1.0/2.0 (which `np.savez`
    writes) are rare; for those the caller loads the whole array instead of streaming rows.
    """
    fmt = np.lib.format
    version = fmt.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(stream)
    else:
        return (-1,), None
    streamable = not fortran and not dtype.hasobject
    return tuple(int(d) for d in shape), dtype if streamable else None


def _npz_rows(path: Path, batch_size: int) -> Iterator[np.ndarray]:
    """Yield X of a `.npz` in batches of rows, reading the archive member as a stream."""
    with zipfile.ZipFile(path) as archive, archive.open("X.npy") as stream:
        shape, dtype = _npy_header(stream)
        if dtype is None:
            with np.load(path, allow_pickle=False) as arrays:
                X = arrays["X"]
            for start in range(0, len(X), batch_size):
                yield X[start : start + batch_size]
            return
        row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            data = stream.read(count * row_bytes)
            if len(data) != count * row_bytes:
                raise DataError(f"{path}: X ends after {start} of {shape[0]} samples")
            # bytearray: a writable batch, like one sliced from a loaded array.
            yield np.frombuffer(bytearray(data), dtype=dtype).reshape((count, *shape[1:]))


def _open_image_folder(root: Path) -> DataSource:
    """List an ImageFolder's images and labels (sorted subfolder names) without decoding them."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class subfolders (expected ImageFolder layout)")
    files: list[Path] = []
    targets: list[int] = []
    for index, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                files.append(file)
                targets.append(index)
    if not files:
        raise DataError(f"{root} holds no images in its class subfolders {classes}")
    return DataSource(root, np.asarray(targets, dtype=np.int64), classes, tuple(files))


def _read_image(file: Path, grayscale: bool) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            return np.asarray(image.convert("L" if grayscale else "RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{file} is not a readable image: {exc}") from exc


def _load_image_folder(root: Path, preprocess: Preprocess) -> Dataset:
    source = _open_image_folder(root)
    # Preprocess in batches into one array: preprocessing all images at once held several
    # float32 copies of the whole set (scale, mean, std, layout) at the peak.
    X: np.ndarray | None = None
    start = 0
    for batch in source.batches(preprocess, 64):
        if X is None:
            X = np.empty((len(source), *batch.shape[1:]), dtype=np.float32)
        if batch.shape[1:] != X.shape[1:]:
            axes = slice(1, 3) if preprocess.layout == "NHWC" else slice(2, 4)
            raise DataError(_different_sizes(X.shape[axes], batch.shape[axes]))
        X[start : start + len(batch)] = batch
        start += len(batch)
    assert X is not None  # the folder holds at least one image
    return Dataset(X, source.y, source.labels)
