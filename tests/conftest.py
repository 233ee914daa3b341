"""Hardened test configuration: strict dtype promotion, warnings as errors, replayable seed.

Runtime type checking of the library's jaxtyping annotations with beartype is switched on
by `--jaxtyping-packages=pdeformer,beartype.beartype` in pyproject.toml's pytest options.
The tests compile with JAX's and XLA's default settings, the programs a user's JAX builds.
"""

import importlib
import os
import random
from pathlib import Path

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")

SEED = int(os.environ.get("PDEFORMER_TEST_SEED", random.randrange(2**31)))
# pytest-xdist's workers start after this module is imported, from this environment: they
# all draw their keys from the one seed the header reports.
os.environ["PDEFORMER_TEST_SEED"] = str(SEED)


def pytest_report_header(config):
    return [f"pdeformer test seed: {SEED} (replay with PDEFORMER_TEST_SEED={SEED})"]


@pytest.fixture
def seed() -> int:
    return SEED


@pytest.fixture
def getkey():
    """A fresh PRNG key on every call, derived from the session seed."""
    key = [jax.random.PRNGKey(SEED)]

    def _next():
        key[0], sub = jax.random.split(key[0])
        return sub

    return _next


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(SEED)


@pytest.fixture
def experiments(monkeypatch):
    """Import a script of `experiments/` by name (they import `_common` as a sibling)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "experiments"))
    return importlib.import_module
