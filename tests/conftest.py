"""Hardened test configuration: strict dtype promotion, warnings as errors, replayable seed.

Runtime type checking of the library's jaxtyping annotations with beartype is switched on
by `--jaxtyping-packages=pdeformer,beartype.beartype` in pyproject.toml's pytest options.
The tests compile with JAX's and XLA's default settings, the programs a user's JAX builds.
"""

import importlib
import importlib.util
import os
import random
import sys
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
    """Import a script of `experiments/` by its path there, e.g. `experiments("bench/data")`
    (module `bench_data`) or `experiments("studies/compare_solvers")`. The scripts import
    `report`, `_cli` and their room's helpers (`_common`, `_timing`, ...) as siblings."""
    root = Path(__file__).resolve().parents[1] / "experiments"
    for folder in (root, root / "studies", root / "bench"):
        monkeypatch.syspath_prepend(str(folder))

    def load(name: str):
        module_name = name.replace("/", "_")
        spec = importlib.util.spec_from_file_location(module_name, root / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        # Registered before it runs: dataclasses (and tyro) look their module up by name.
        monkeypatch.setitem(sys.modules, module_name, module)
        spec.loader.exec_module(module)
        return module

    return load
