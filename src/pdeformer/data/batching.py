"""Compact split containers, on-disk caching and deterministic, resumable batch iteration.

A `Split` stores token ids as `uint8`/`uint16` (about 4x smaller than int32, 16x smaller than a
float32 one-hot), per-example lengths and labels. `iterate_batches` turns a split into padded
`Batch`es of `int32` tokens and boolean masks. The order of batches is a pure function of
`(seed, epoch)`, so a run can resume at any `start_step` and see exactly the batches it would
have seen had it not stopped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from jaxtyping import Bool, Int32

__all__ = [
    "Batch",
    "Split",
    "TaskData",
    "batch_order",
    "iterate_batches",
    "iterate_forever",
    "load_split",
    "num_batches",
    "pad_sequences",
    "save_split",
]


def _compact_dtype(max_id: int) -> type[np.unsignedinteger]:
    return np.uint8 if max_id < 256 else np.uint16


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One split of a task: padded token ids, lengths and labels as compact numpy arrays.

    Dual-input tasks (Retrieval) also carry `tokens2`/`lengths2` for the second document.

    **Arguments:**

    - `tokens`: `uint8` or `uint16` array `(n, max_len)`, padded with 0 after each length.
    - `lengths`: `int32` array `(n,)`, the number of valid tokens per row.
    - `labels`: `int32` array `(n,)`.
    - `tokens2`, `lengths2`: the second input for dual tasks, or `None`.

    **Raises:**

    `ValueError` if dtypes, shapes or lengths are inconsistent.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    tokens2: np.ndarray | None = None
    lengths2: np.ndarray | None = None

    def __post_init__(self) -> None:
        pairs = [("tokens", self.tokens, self.lengths)]
        if (self.tokens2 is None) != (self.lengths2 is None):
            raise ValueError("tokens2 and lengths2 must both be given or both be None.")
        if self.tokens2 is not None:
            pairs.append(("tokens2", self.tokens2, self.lengths2))
        n = self.labels.shape[0]
        if self.labels.dtype != np.int32 or self.labels.ndim != 1:
            raise ValueError(
                f"labels must be a 1-D int32 array, got {self.labels.dtype} {self.labels.shape}."
            )
        for name, tok, lens in pairs:
            if tok.dtype not in (np.uint8, np.uint16) or tok.ndim != 2:
                raise ValueError(
                    f"{name} must be a 2-D uint8 or uint16 array (compact storage), got "
                    f"{tok.dtype} with shape {tok.shape}; convert with pad_sequences()."
                )
            if lens.dtype != np.int32 or lens.shape != (n,) or tok.shape[0] != n:
                raise ValueError(
                    f"{name}: expected {n} rows and int32 lengths of shape ({n},), got "
                    f"{tok.shape[0]} rows and lengths {lens.dtype} {lens.shape}."
                )
            if n and (lens.min() < 0 or lens.max() > tok.shape[1]):
                raise ValueError(
                    f"{name}: lengths must lie in [0, {tok.shape[1]}], got "
                    f"[{lens.min()}, {lens.max()}]."
                )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def dual(self) -> bool:
        """Whether this split has a second input (`tokens2`)."""
        return self.tokens2 is not None

    @property
    def nbytes(self) -> int:
        """Total bytes held by the arrays."""
        arrays = [self.tokens, self.lengths, self.labels, self.tokens2, self.lengths2]
        return sum(a.nbytes for a in arrays if a is not None)

    def take(self, indices: Sequence[int] | np.ndarray) -> Split:
        """Return the sub-split with the given row indices (in that order).

        **Arguments:**

        - `indices`: integer row indices.

        **Returns:**

        A new `Split`.
        """
        idx = np.asarray(indices, dtype=np.int64)
        return Split(
            tokens=self.tokens[idx],
            lengths=self.lengths[idx],
            labels=self.labels[idx],
            tokens2=None if self.tokens2 is None else self.tokens2[idx],
            lengths2=None if self.lengths2 is None else self.lengths2[idx],
        )


@dataclasses.dataclass(frozen=True, eq=False)
class TaskData:
    """A task's splits plus what a model needs to know about it.

    **Arguments:**

    - `train`, `val`, `test`: the splits.
    - `vocab_size`: number of token ids including pad id 0.
    - `num_classes`: number of labels.
    - `dual`: whether examples have two inputs (Retrieval).
    - `name`: task name; stand-ins carry a distinct name (e.g. `image_digits_standin`).
    - `description`: where the data came from and how it was tokenized.
    """

    train: Split
    val: Split
    test: Split
    vocab_size: int
    num_classes: int
    dual: bool
    name: str
    description: str


class Batch(NamedTuple):
    """One batch. `mask` is True at valid positions; `*2` fields are None for single-input tasks."""

    tokens: Int32[np.ndarray, "b l"]
    mask: Bool[np.ndarray, "b l"]
    labels: Int32[np.ndarray, " b"]
    tokens2: Int32[np.ndarray, "b l2"] | None = None
    mask2: Bool[np.ndarray, "b l2"] | None = None


def pad_sequences(
    sequences: Sequence[np.ndarray] | Sequence[bytes],
    max_length: int | None = None,
    offset: int = 0,
) -> tuple[np.ndarray, Int32[np.ndarray, " n"]]:
    """Pad (and truncate) variable-length id sequences into a compact 2-D array.

    **Arguments:**

    - `sequences`: integer arrays, or `bytes` objects (then each byte b becomes id `b + offset`).
    - `max_length`: truncate to this many tokens; `None` means the longest sequence.
    - `offset`: added to every id (1 for LRA's byte encoding, which reserves 0 for padding).

    **Returns:**

    `(tokens, lengths)` with `tokens` uint8 if every id fits in 0-255, else uint16.

    **Raises:**

    `ValueError` if an id is negative or does not fit in uint16, or `max_length < 1`.
    """
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1 or None, got {max_length}.")
    arrays = [
        np.frombuffer(s, dtype=np.uint8) if isinstance(s, bytes | bytearray) else np.asarray(s)
        for s in sequences
    ]
    if max_length is not None:
        arrays = [a[:max_length] for a in arrays]
    lengths = np.asarray([a.shape[0] for a in arrays], dtype=np.int32)
    width = int(lengths.max()) if len(arrays) else 0
    if max_length is not None:
        width = min(width, max_length)
    max_id = max((int(a.max()) for a in arrays if a.size), default=0) + offset
    min_id = min((int(a.min()) for a in arrays if a.size), default=0) + offset
    if min_id < 0 or max_id > 65535:
        raise ValueError(f"token ids must lie in [0, 65535], got range [{min_id}, {max_id}].")
    dtype = _compact_dtype(max_id)
    tokens = np.zeros((len(arrays), max(width, 1)), dtype=dtype)
    for i, a in enumerate(arrays):
        tokens[i, : a.shape[0]] = a.astype(np.int64) + offset if offset else a
    return tokens, lengths


def save_split(path: str | Path, split: Split) -> None:
    """Save a split to a compressed `.npz` file, keeping the compact dtypes.

    **Arguments:**

    - `path`: destination file (a `.npz` suffix is conventional).
    - `split`: the split to save.
    """
    arrays = {"tokens": split.tokens, "lengths": split.lengths, "labels": split.labels}
    if split.tokens2 is not None and split.lengths2 is not None:
        arrays["tokens2"] = split.tokens2
        arrays["lengths2"] = split.lengths2
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def load_split(path: str | Path) -> Split:
    """Load a split written by `save_split`.

    **Arguments:**

    - `path`: the `.npz` file.

    **Returns:**

    The `Split`.

    **Raises:**

    `FileNotFoundError` if the file is missing; `ValueError` if it lacks required arrays.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"No cached split at {p}; create it with save_split(path, split).")
    with np.load(p, allow_pickle=False) as z:
        missing = {"tokens", "lengths", "labels"} - set(z.files)
        if missing:
            raise ValueError(f"{p}: not a split file, missing arrays {sorted(missing)}.")
        return Split(
            tokens=z["tokens"],
            lengths=z["lengths"],
            labels=z["labels"],
            tokens2=z["tokens2"] if "tokens2" in z.files else None,
            lengths2=z["lengths2"] if "lengths2" in z.files else None,
        )


def num_batches(n: int, batch_size: int, drop_remainder: bool = True) -> int:
    """Number of batches per epoch for `n` examples.

    **Arguments:**

    - `n`: number of examples.
    - `batch_size`: examples per batch.
    - `drop_remainder`: whether the last partial batch is dropped.

    **Returns:**

    The batch count.
    """
    return n // batch_size if drop_remainder else -(-n // batch_size)


def batch_order(
    lengths: np.ndarray,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
    bucket_batches: int = 0,
) -> list[np.ndarray]:
    """The list of example-index arrays, one per batch, for one epoch.

    The result depends only on the arguments, which is what makes resuming exact.

    **Arguments:**

    - `lengths`: per-example lengths (used for bucketing; for dual inputs pass the max).
    - `batch_size`: examples per batch.
    - `seed`, `epoch`: the permutation is drawn from `np.random.default_rng([seed, epoch])`.
    - `shuffle`: if False, examples come in storage order (evaluation).
    - `drop_remainder`: drop the final partial batch.
    - `bucket_batches`: if > 0, the shuffled order is cut into windows of
      `bucket_batches * batch_size` examples, each window is sorted by length and cut into
      batches, and the batches are shuffled again. Batches then hold similar lengths, so padding
      to the batch maximum wastes less compute, while the order stays random.

    **Returns:**

    A list of `int64` index arrays.

    **Raises:**

    `ValueError` if `batch_size < 1` or `bucket_batches < 0`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if bucket_batches < 0:
        raise ValueError(f"bucket_batches must be >= 0, got {bucket_batches}.")
    n = int(lengths.shape[0])
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    if bucket_batches > 0:
        window = bucket_batches * batch_size
        pieces = []
        for start in range(0, n, window):
            chunk = order[start : start + window]
            pieces.append(chunk[np.argsort(lengths[chunk], kind="stable")])
        order = np.concatenate(pieces) if pieces else order
    nb = num_batches(n, batch_size, drop_remainder)
    batches = [order[i * batch_size : (i + 1) * batch_size] for i in range(nb)]
    if bucket_batches > 0 and shuffle:
        # Without this second shuffle every window would yield short batches first.
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def _pad(
    tokens: np.ndarray, lengths: np.ndarray, idx: np.ndarray, pad_to: int | None, multiple: int
) -> tuple[np.ndarray, np.ndarray]:
    longest = int(lengths[idx].max()) if idx.size else 0
    if pad_to is None:
        width = max(1, -(-longest // multiple) * multiple)
    else:
        if longest > pad_to:
            raise ValueError(
                f"pad_to={pad_to} is shorter than a sequence of length {longest} in this batch; "
                "use pad_to >= the split's max length or pad_to=None."
            )
        width = pad_to
    out = np.zeros((idx.size, width), dtype=np.int32)
    w = min(width, tokens.shape[1])
    out[:, :w] = tokens[idx, :w]
    mask = np.arange(width)[None, :] < lengths[idx][:, None]
    return out, mask


def iterate_batches(
    split: Split,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = True,
    pad_to: int | None = None,
    pad_multiple: int = 1,
    bucket_batches: int = 0,
    start_step: int = 0,
) -> Iterator[Batch]:
    """Yield the batches of one epoch, optionally starting part way through.

    **Arguments:**

    - `split`: the data.
    - `batch_size`: examples per batch.
    - `seed`, `epoch`, `shuffle`, `drop_remainder`, `bucket_batches`: see `batch_order`.
    - `pad_to`: fixed padded length; `None` pads to the batch's longest sequence rounded up to
      `pad_multiple` (a multiple such as 128 limits how many shapes a jitted step compiles for).
    - `pad_multiple`: rounding for `pad_to=None`.
    - `start_step`: skip the first `start_step` batches of this epoch (resume).

    **Returns:**

    An iterator of `Batch` with `int32` tokens, `bool` masks (True = valid) and `int32` labels.

    **Raises:**

    `ValueError` for non-positive sizes, a negative `start_step`, or `pad_to` shorter than a
    sequence.
    """
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}.")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    lengths = split.lengths
    if split.lengths2 is not None:
        lengths = np.maximum(lengths, split.lengths2)
    order = batch_order(
        lengths,
        batch_size,
        seed=seed,
        epoch=epoch,
        shuffle=shuffle,
        drop_remainder=drop_remainder,
        bucket_batches=bucket_batches,
    )
    for idx in order[start_step:]:
        tokens, mask = _pad(split.tokens, split.lengths, idx, pad_to, pad_multiple)
        tokens2 = mask2 = None
        if split.tokens2 is not None and split.lengths2 is not None:
            tokens2, mask2 = _pad(split.tokens2, split.lengths2, idx, pad_to, pad_multiple)
        yield Batch(tokens, mask, split.labels[idx], tokens2, mask2)


def iterate_forever(
    split: Split,
    batch_size: int,
    *,
    seed: int = 0,
    start_step: int = 0,
    **options: object,
) -> Iterator[tuple[int, Batch]]:
    """Yield `(global_step, batch)` across epochs forever, resumable from any global step.

    Epoch `e` uses `batch_order(..., seed=seed, epoch=e)`; global step `s` is batch
    `s % steps_per_epoch` of epoch `s // steps_per_epoch`. Remainders are always dropped so
    every epoch has the same number of steps.

    **Arguments:**

    - `split`, `batch_size`, `seed`: as in `iterate_batches`.
    - `start_step`: first global step to produce.
    - `options`: further keyword arguments of `iterate_batches` (`pad_to`, `bucket_batches`,
      ...), except `epoch`, `start_step` and `drop_remainder`.

    **Returns:**

    An endless iterator of `(step, Batch)`.

    **Raises:**

    `ValueError` if the split has fewer than `batch_size` examples.
    """
    per_epoch = num_batches(len(split), batch_size, drop_remainder=True)
    if per_epoch == 0:
        raise ValueError(
            f"split has {len(split)} examples, fewer than batch_size={batch_size}; "
            "use a smaller batch."
        )
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        for batch in iterate_batches(
            split,
            batch_size,
            seed=seed,
            epoch=epoch,
            drop_remainder=True,
            start_step=offset,
            **options,  # type: ignore[arg-type]
        ):
            yield step, batch
            step += 1
