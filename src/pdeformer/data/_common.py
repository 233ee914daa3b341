"""Shared helpers: missing-data errors, seeding and splitting."""

from __future__ import annotations

from collections.abc import Sequence
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
