"""Shared test helpers: tolerances live here, chosen per dtype."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np

TOLERANCES = {
    np.dtype("float32"): dict(rtol=1e-5, atol=1e-5),
    np.dtype("float64"): dict(rtol=1e-10, atol=1e-10),
}


def tree_allclose(x, y, *, rtol=None, atol=None) -> bool:
    """`True` when two pytrees have equal structure and all leaves are close."""
    lx, tx = jax.tree.flatten(x)
    ly, ty = jax.tree.flatten(y)
    if tx != ty:
        return False
    for a, b in zip(lx, ly, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return False
        tol = TOLERANCES.get(a.dtype, dict(rtol=1e-5, atol=1e-5))
        r = tol["rtol"] if rtol is None else rtol
        t = tol["atol"] if atol is None else atol
        if not np.allclose(a, b, rtol=r, atol=t):
            return False
    return True


def max_abs_diff(x, y) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y))))


def prefix_mask(lengths, seq: int):
    return jnp.arange(seq)[None, :] < jnp.asarray(lengths)[:, None]


def dot_precisions(text: str) -> list[str]:
    """The precision of every contracting `dot_general` (a matmul) in a StableHLO module;
    scalings by a scalar (`contracting_dims = [] x []`, from diffrax's adjoint) are not
    matmuls and are left out."""
    return re.findall(
        r"stablehlo\.dot_general(?:(?!contracting_dims = \[\] x \[\]).)*?"
        r"precision = \[(\w+), \w+\]",
        text,
    )


def cpu_devices_env(devices: int) -> dict[str, str]:
    """The environment for a child process with `devices` virtual CPU devices.

    It keeps the environment's `XLA_FLAGS` and adds the device count.
    """
    flag = f"--xla_force_host_platform_device_count={devices}"
    flags = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")


def default_codegen_jit(fn):
    """`jax.jit(fn)`: the tests compile with XLA's default settings throughout."""
    return jax.jit(fn)
