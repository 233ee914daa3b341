"""Shared helpers: missing-data and undecodable-text errors, seeding and splitting."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

LRA_SOURCE = (
    "the LRA release archive lra_release.gz linked from "
    "https://github.com/google-research/long-range-arena (extract with `tar -xzf`)"
)
IMDB_SOURCE = (
    "Stanford's Large Movie Review Dataset, https://ai.stanford.edu/~amaas/data/sentiment/ "
    "(aclImdb_v1.tar.gz)"
)
CIFAR_SOURCE = (
    "the CIFAR-10 python version, https://www.cs.toronto.edu/~kriz/cifar.html "
    "(cifar-10-python.tar.gz)"
)


def require_files(task: str, root: Path, expected: Sequence[str], source: str) -> None:
    """Raise `FileNotFoundError` listing every expected file if any is missing."""
    missing = [name for name in expected if not (root / name).exists()]
    if missing:
        listing = "\n".join(f"  {root / name}" for name in expected)
        raise FileNotFoundError(
            f"{task}: official data not found under {root} (missing: {', '.join(missing)}).\n"
            f"Expected files:\n{listing}\n"
            f"The official data comes from {source}. Pass data_dir=None to use the offline "
            "generator or stand-in instead."
        )


def make_rng(seed: int | np.random.Generator) -> np.random.Generator:
    """Accept an int seed or a Generator (seeded generation is reproducible)."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")


def check_split_sizes(config: object) -> None:
    """Refuse a negative `num_train`, `num_val` or `num_test`; a split may be empty (size 0)."""
    for name in ("num_train", "num_val", "num_test"):
        value = getattr(config, name)
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (0 gives an empty split), got {value}.")


def decode_utf8(raw: bytes, path: str | Path, first_line: int = 1) -> str:
    """Decode UTF-8 text read from `path`, or raise an error that names the file and line.

    **Arguments:**

    - `raw`: the bytes, a whole file or one of its lines.
    - `path`: the file they come from, for the message.
    - `first_line`: the line number of `raw`'s first line in the file.

    **Returns:**

    The text.

    **Raises:**

    `ValueError` naming `path`, the line and column of the first undecodable byte.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = raw[: exc.start]
        line = first_line + before.count(b"\n")
        column = exc.start - (before.rfind(b"\n") + 1) + 1
        raise ValueError(
            f"{path}:{line}: not valid UTF-8 text (byte {raw[exc.start]:#04x} at column "
            f"{column}); the file is damaged or is not the text file expected here."
        ) from None


def read_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """The lines of a UTF-8 text file, numbered from 1, without their line endings.

    Lines end at `\n` only (a `\r` before it is dropped), so a field may hold other control
    characters, as LRA's readers allow.

    **Raises:**

    `ValueError` naming the file and line of the first undecodable byte (`decode_utf8`).
    """
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            yield lineno, decode_utf8(raw, path, lineno).rstrip("\r\n")
