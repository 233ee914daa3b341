"""Image classification: the CIFAR-10 reader (grayscale, as LRA) and a `load_digits` stand-in.

Pixels are tokens 0-255 (vocab 256) in row-major order, and every position is valid: black
pixels are real tokens, not padding (LRA's `inputs > 0` mask is a known pitfall).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from jaxtyping import UInt8

from ._common import CIFAR_SOURCE, require_files
from .batching import Split, TaskData

__all__ = [
    "cifar_to_gray",
    "load_cifar10",
    "make_digits_task",
    "read_cifar_batch",
    "rgb_to_gray_tf",
    "upsample_digits",
]

_CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR_FILES = [*_CIFAR_TRAIN, "test_batch"]


def _image_split(images: np.ndarray, labels: np.ndarray) -> Split:
    n, height, width = images.shape
    tokens = np.ascontiguousarray(images.reshape(n, height * width).astype(np.uint8))
    return Split(
        tokens=tokens,
        lengths=np.full(n, tokens.shape[1], dtype=np.int32),
        labels=labels.astype(np.int32),
    )


def rgb_to_gray_tf(rgb: UInt8[np.ndarray, "*batch 3"]) -> UInt8[np.ndarray, "*batch"]:
    """Grayscale conversion matching `tf.image.rgb_to_grayscale` on uint8 input.

    TensorFlow converts to float32 in [0, 1], takes the dot product with
    `(0.2989, 0.5870, 0.1140)`, then converts back by multiplying by 255.5 and truncating with
    saturation. LRA then casts to int32, which leaves these values unchanged.

    **Arguments:**

    - `rgb`: uint8 array whose last axis holds R, G, B.

    **Returns:**

    A uint8 array with the last axis removed.
    """
    flt = rgb.astype(np.float32) * np.float32(1.0 / 255.0)
    weights = np.asarray([0.2989, 0.5870, 0.1140], dtype=np.float32)
    gray = (flt * weights).sum(axis=-1, dtype=np.float32) * np.float32(255.5)
    return np.clip(gray, 0.0, 255.0).astype(np.uint8)


def cifar_to_gray(rows: UInt8[np.ndarray, "n 3072"]) -> UInt8[np.ndarray, "n 32 32"]:
    """Convert CIFAR pickle rows (1024 R, then G, then B) to grayscale as LRA does.

    **Arguments:**

    - `rows`: uint8 array `(n, 3072)`.

    **Returns:**

    uint8 `(n, 32, 32)` from `tf.image.rgb_to_grayscale` (weights 0.2989, 0.5870, 0.1140).
    """
    rgb = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return rgb_to_gray_tf(np.ascontiguousarray(rgb))


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one `cifar-10-batches-py` pickle.

    **Arguments:**

    - `path`: e.g. `cifar-10-batches-py/data_batch_1`.

    **Returns:**

    `(gray_images uint8 (n, 32, 32), labels int32 (n,))`.

    **Raises:**

    `ValueError` naming the file if it is not a CIFAR batch pickle (missing `data`/`labels`,
    wrong shape, label out of 0-9). Only open files you trust: this unpickles.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError) as exc:
        raise ValueError(f"{path}: not a CIFAR-10 pickle ({exc}).") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict pickle, got {type(obj).__name__}.")
    data = obj.get(b"data", obj.get("data"))
    labels = obj.get(b"labels", obj.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: CIFAR batch must contain 'data' and 'labels' keys.")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{path}: expected data of shape (n, 3072) and n labels, got {data.shape} and "
            f"{labels.shape}."
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels must be 0-9, got [{labels.min()}, {labels.max()}].")
    return cifar_to_gray(data.astype(np.uint8)), labels.astype(np.int32)


def load_cifar10(data_dir: str | Path, val_fraction: float = 0.1) -> TaskData:
    """Load grayscale CIFAR-10 with LRA's split: train[:90%] / train[90%:] / test.

    The training batches are concatenated in file order (TFDS may order them differently, so
    the exact validation images can differ from LRA's).

    **Arguments:**

    - `data_dir`: directory containing `cifar-10-batches-py/`, or that directory itself.
    - `val_fraction`: trailing fraction of the training set used for validation, in
      `[0, 1]` (0 gives an empty validation split).

    **Returns:**

    `TaskData` (vocab 256, 10 classes, length 1024).

    **Raises:**

    `ValueError` for a `val_fraction` outside `[0, 1]`; `FileNotFoundError` listing the
    expected files and where to download them.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(
            f"val_fraction must lie in [0, 1] (the trailing fraction of the training batches "
            f"kept for validation; LRA uses 0.1), got {val_fraction}."
        )
    root = Path(data_dir)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    require_files("image (CIFAR-10)", root, _CIFAR_FILES, CIFAR_SOURCE)
    parts = [read_cifar_batch(root / name) for name in _CIFAR_TRAIN]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    n_train = int(round(x.shape[0] * (1.0 - val_fraction)))
    xt, yt = read_cifar_batch(root / "test_batch")
    return TaskData(
        _image_split(x[:n_train], y[:n_train]),
        _image_split(x[n_train:], y[n_train:]),
        _image_split(xt, yt),
        vocab_size=256,
        num_classes=10,
        dual=False,
        name="image",
        description=f"CIFAR-10 from {root}, grayscale as tf.image.rgb_to_grayscale, 1024 tokens.",
    )


def upsample_digits(images: np.ndarray, size: int = 32) -> UInt8[np.ndarray, "n size size"]:
    """Bilinearly upsample 8x8 digits (values 0-16) to `size`x`size` and quantise to 0-255.

    **Arguments:**

    - `images`: array `(n, 8, 8)` with values 0-16.
    - `size`: output side length.

    **Returns:**

    uint8 `(n, size, size)`.
    """
    src = images.shape[-1]
    # Separable linear interpolation with pixel centres aligned (like align_corners=False).
    pos = (np.arange(size) + 0.5) * src / size - 0.5
    pos = np.clip(pos, 0, src - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, src - 1)
    w = pos - lo
    interp = np.zeros((size, src))
    interp[np.arange(size), lo] += 1 - w
    interp[np.arange(size), hi] += w
    up = np.einsum("ij,njk,lk->nil", interp, images.astype(np.float64), interp)
    return np.clip(np.rint(up * (255.0 / 16.0)), 0, 255).astype(np.uint8)


def make_digits_task(
    seed: int = 0, size: int = 32, val_fraction: float = 0.15, test_fraction: float = 0.15
) -> TaskData:
    """Offline stand-in for LRA Image: scikit-learn's 8x8 digits upsampled to `size`x`size`.

    This is NOT CIFAR-10: 1,797 handwritten digits (10 classes) shipped inside the
    scikit-learn wheel, upsampled bilinearly and quantised to 0-255, split stratified by
    class with a fixed seed (default about 1,257 / 270 / 270).

    **Arguments:**

    - `seed`: seed of the stratified split.
    - `size`: image side (32 gives LRA Image's 1024-token sequences).
    - `val_fraction`, `test_fraction`: per-class fractions for val and test (0 gives an empty
      split).

    **Returns:**

    `TaskData` named `image_digits_standin` (vocab 256, 10 classes).

    **Raises:**

    `ImportError` if scikit-learn is missing; `ValueError` for fractions below 0 or summing
    to more than 1.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "The offline image stand-in needs scikit-learn: pip install pdeformer[data]"
        ) from exc
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction <= 1):
        raise ValueError(
            f"need 0 <= val_fraction, test_fraction and their sum <= 1 (0 gives an empty "
            f"split), got {val_fraction}, {test_fraction}."
        )
    digits = load_digits()
    images = upsample_digits(np.asarray(digits.images), size)
    labels = np.asarray(digits.target, dtype=np.int32)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(idx.size * val_fraction))
        n_test = int(round(idx.size * test_fraction))
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    splits = {k: np.sort(np.concatenate(v)) for k, v in parts.items()}
    return TaskData(
        *(_image_split(images[splits[k]], labels[splits[k]]) for k in ("train", "val", "test")),
        vocab_size=256,
        num_classes=10,
        dual=False,
        name="image_digits_standin",
        description=(
            f"STAND-IN for LRA Image (not CIFAR-10): sklearn load_digits upsampled to "
            f"{size}x{size}, intensities 0-255, stratified split seed {seed}."
        ),
    )
