"""Retrieval (document matching): the AAN TSV reader and a synthetic dual-document task.

LRA encodes each document as bytes (`byte + 1`, 0 = pad, vocab 257): the raw text is first cut
to 10,000 characters, then encoded and truncated to `max_length` (4000).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ._common import (
    LRA_SOURCE,
    check_positive,
    check_split_sizes,
    make_rng,
    read_lines,
    require_files,
)
from .batching import Split, TaskData, pad_sequences
from .text import _LETTERS, BYTE_VOCAB_SIZE, plant_keys, random_prose

__all__ = [
    "SyntheticRetrievalConfig",
    "generate_retrieval",
    "load_aan",
    "make_retrieval_task",
    "read_aan_tsv",
]

_AAN_FILES = {
    "train": "new_aan_pairs.train.tsv",
    "val": "new_aan_pairs.eval.tsv",
    "test": "new_aan_pairs.test.tsv",
}


def read_aan_tsv(path: str | Path, max_length: int = 4000) -> Split:
    """Read one AAN pairs file: no header, 5 tab-separated columns `label id1 id2 text1 text2`.

    Quotes are not special (LRA reads with `use_quote_delim=False`); the label is parsed as a
    float and cast to int, as LRA does.

    **Arguments:**

    - `path`: e.g. `tsv_data/new_aan_pairs.train.tsv`.
    - `max_length`: bytes kept per document after cutting the text to 10,000 characters.

    **Returns:**

    A dual `Split` (`tokens`, `tokens2`) with uint16 byte ids.

    **Raises:**

    `FileNotFoundError` if missing; `ValueError` naming the file and line for bytes that are
    not UTF-8, a row without exactly 5 columns or a label that is not 0 or 1.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"AAN file not found: {path}.")
    docs1: list[bytes] = []
    docs2: list[bytes] = []
    labels: list[int] = []
    for lineno, line in read_lines(path):
        if not line:
            continue
        cols = line.split("\t")
        if len(cols) != 5:
            raise ValueError(
                f"{path}:{lineno}: expected 5 tab-separated columns (label, id1, id2, "
                f"text1, text2), got {len(cols)}."
            )
        try:
            label = int(float(cols[0]))
        except ValueError:
            raise ValueError(f"{path}:{lineno}: label {cols[0]!r} is not a number.") from None
        if label not in (0, 1):
            raise ValueError(f"{path}:{lineno}: label must be 0 or 1, got {label}.")
        docs1.append(cols[3][:10_000].encode("utf-8")[:max_length])
        docs2.append(cols[4][:10_000].encode("utf-8")[:max_length])
        labels.append(label)
    if not labels:
        raise ValueError(f"{path}: file has no rows.")
    t1, l1 = pad_sequences(docs1, max_length=max_length, offset=1)
    t2, l2 = pad_sequences(docs2, max_length=max_length, offset=1)
    return Split(
        tokens=t1.astype(np.uint16),
        lengths=l1,
        labels=np.asarray(labels, dtype=np.int32),
        tokens2=t2.astype(np.uint16),
        lengths2=l2,
    )


def load_aan(data_dir: str | Path, max_length: int = 4000) -> TaskData:
    """Load the official AAN retrieval splits (train / eval -> val / test).

    **Arguments:**

    - `data_dir`: the extracted LRA release directory containing `tsv_data/`, or the directory
      holding the `new_aan_pairs.*.tsv` files.
    - `max_length`: bytes per document.

    **Returns:**

    Dual `TaskData` (vocab 257, 2 classes).

    **Raises:**

    `FileNotFoundError` listing the expected files and the data's origin if any is missing.
    """
    root = Path(data_dir)
    if (root / "tsv_data").is_dir():
        root = root / "tsv_data"
    require_files("retrieval (AAN)", root, list(_AAN_FILES.values()), LRA_SOURCE)
    splits = {k: read_aan_tsv(root / v, max_length) for k, v in _AAN_FILES.items()}
    return TaskData(
        splits["train"],
        splits["val"],
        splits["test"],
        vocab_size=BYTE_VOCAB_SIZE,
        num_classes=2,
        dual=True,
        name="retrieval",
        description=f"Official LRA AAN pairs from {root}, bytes+1, max_length {max_length}.",
    )


@dataclasses.dataclass(frozen=True)
class SyntheticRetrievalConfig:
    """Settings of the synthetic retrieval task (see `generate_retrieval`).

    **Arguments:**

    - `min_length`, `max_length`: document length range in bytes (inclusive).
    - `key_length`: letters in the planted citation key `<...>`.
    - `key_alphabet`: how many distinct letters keys use (smaller = keys easier to encode).
    - `num_train`, `num_val`, `num_test`: split sizes.
    """

    min_length: int = 1000
    max_length: int = 1000
    key_length: int = 4
    key_alphabet: int = 10
    num_train: int = 20_000
    num_val: int = 2_000
    num_test: int = 2_000

    def __post_init__(self) -> None:
        check_positive("key_length", self.key_length)
        check_split_sizes(self)
        if not 2 <= self.key_alphabet <= 26:
            raise ValueError(f"key_alphabet must lie in [2, 26], got {self.key_alphabet}.")
        if self.min_length < 2 * (self.key_length + 2) or self.max_length < self.min_length:
            raise ValueError(
                f"need {2 * (self.key_length + 2)} <= min_length <= max_length, got "
                f"min_length={self.min_length}, max_length={self.max_length}."
            )


def generate_retrieval(
    num_examples: int,
    config: SyntheticRetrievalConfig = SyntheticRetrievalConfig(),
    seed: int | np.random.Generator = 0,
) -> Split:
    """Synthetic document pairs whose label is whether they share a planted citation key.

    Construction: each document is random lowercase letters and spaces (length uniform in
    `[min_length, max_length]`) with exactly one key `<k>` (`key_length` letters from the first
    `key_alphabet` letters, delimited by `<` `>`, which never occur in the filler). In the first
    document the key lies in its first half, in the second document in its second half, so
    matching keys are far apart in the concatenated pair and neither half of a document can be
    ignored. Label 1: both keys are equal; label 0: the second key differs from the first in at
    least one letter. Labels are balanced Bernoulli(0.5).

    **Arguments:**

    - `num_examples`: number of pairs.
    - `config`: lengths and key settings.
    - `seed`: int seed or generator.

    **Returns:**

    A dual `Split` with uint16 byte ids (`byte + 1`).
    """
    rng = make_rng(seed)
    n, k = num_examples, config.key_length
    alphabet = _LETTERS[: config.key_alphabet]
    labels = rng.integers(0, 2, size=n).astype(np.int32)
    key1 = rng.integers(0, config.key_alphabet, size=(n, k))
    key2 = rng.integers(0, config.key_alphabet, size=(n, k))
    same = (key1 == key2).all(axis=1)
    key2[same, 0] = (key2[same, 0] + 1) % config.key_alphabet
    key2 = np.where(labels[:, None] == 1, key1, key2)
    out = []
    for half, key in ((0, key1), (1, key2)):
        lengths = rng.integers(config.min_length, config.max_length + 1, size=n)
        docs = random_prose(rng, n, config.max_length)
        mid = lengths // 2
        lo = np.where(half == 0, 0, mid)
        hi = np.where(half == 0, np.maximum(mid, k + 2), lengths)
        plant_keys(docs, rng, alphabet[key], lo, hi)
        valid = np.arange(config.max_length)[None, :] < lengths[:, None]
        out.append((np.where(valid, docs.astype(np.uint16) + 1, 0).astype(np.uint16), lengths))
    (t1, l1), (t2, l2) = out
    return Split(
        tokens=t1,
        lengths=l1.astype(np.int32),
        labels=labels,
        tokens2=t2,
        lengths2=l2.astype(np.int32),
    )


def make_retrieval_task(
    config: SyntheticRetrievalConfig = SyntheticRetrievalConfig(), seed: int = 0
) -> TaskData:
    """Build the synthetic retrieval task's splits (see `generate_retrieval`).

    **Arguments:**

    - `config`: settings and split sizes.
    - `seed`: int seed.

    **Returns:**

    Dual `TaskData` named `retrieval_synthetic` (vocab 257, 2 classes).
    """
    rng = np.random.default_rng(seed)
    splits = [
        generate_retrieval(m, config, rng)
        for m in (config.num_train, config.num_val, config.num_test)
    ]
    return TaskData(
        *splits,
        vocab_size=BYTE_VOCAB_SIZE,
        num_classes=2,
        dual=True,
        name="retrieval_synthetic",
        description=(
            "Synthetic stand-in for AAN (NOT real papers): random-letter document pairs; label 1 "
            "iff the <key> in the first half of doc 1 equals the <key> in the second half of "
            f"doc 2; lengths {config.min_length}-{config.max_length} bytes per document."
        ),
    )
