"""Hardened test configuration: strict dtype promotion, warnings as errors, replayable seed.

Runtime type checking of the library's jaxtyping annotations with beartype is switched on
by `--jaxtyping-packages=pdeformer,beartype.beartype` in pyproject.toml's pytest options.

XLA compiles the tests' programs with its backend optimisations off
(`JAX_DISABLE_MOST_OPTIMIZATIONS=1`, unless the environment already sets it): most of the
suite's time is compiling, and the tests check what a program computes, not how fast.
`JAX_DISABLE_MOST_OPTIMIZATIONS=0 python -m pytest` runs them fully optimised.

For the same reason XLA's CPU backend generates their code with its classic emitters
(`--xla_cpu_use_fusion_emitters=false` is added to `XLA_FLAGS`): on the suite's small
programs its newer fusion emitters were slower to compile (three test files took about a
third longer with them; docs/architecture.md, *Test configuration*). Unoptimised, the
classic emitters can round the same operations differently in two programs, so the tests
that claim two programs agree bit for bit compile them with the default emitters
(`helpers.default_codegen_jit`). A user's `XLA_FLAGS` that names the flag is left as it is,
and a JAX whose XLA does not know the flag runs the tests without it.
"""

import importlib
import importlib.util
import os
import random
import sys
from pathlib import Path

# Before JAX is imported, and in the environment so that the subprocesses some tests start
# (several devices, several processes, experiment scripts) inherit it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

from helpers import CLASSIC_EMITTERS, FUSION_EMITTERS, xla_accepts  # noqa: E402

_flags = os.environ.get("XLA_FLAGS", "")
if FUSION_EMITTERS not in _flags and "PDEFORMER_TEST_XLA_PROBE" not in os.environ:
    # pytest-xdist's workers inherit the outcome below and skip the probe.
    _with = f"{_flags} {CLASSIC_EMITTERS}".strip()
    _accepted = xla_accepts(_with)
    os.environ["PDEFORMER_TEST_XLA_PROBE"] = "accepted" if _accepted else "refused"
    if _accepted:
        os.environ["XLA_FLAGS"] = _with

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")

SEED = int(os.environ.get("PDEFORMER_TEST_SEED", random.randrange(2**31)))
# pytest-xdist's workers start after this module is imported, from this environment: they
# all draw their keys from the one seed the header reports.
os.environ["PDEFORMER_TEST_SEED"] = str(SEED)


def pytest_report_header(config):
    return [
        f"pdeformer test seed: {SEED} (replay with PDEFORMER_TEST_SEED={SEED})",
        f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '')!r}",
    ]


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
