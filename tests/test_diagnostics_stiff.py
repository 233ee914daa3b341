"""Diagnostics: roughness and commutators. (The stiff path is tested in `test_stiff.py`.)"""

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import pytest

import pdeformer as pf
from pdeformer.diagnostics import (
    commutator,
    dirichlet_energy,
    model_commutator,
    roughness_profile,
)
from pdeformer.operators.diffusion_layer import DiffusionLayer


def test_dirichlet_energy_constant_and_mask():
    u = jnp.ones((5, 3))
    assert float(dirichlet_energy(u)) == 0.0
    v = jnp.arange(5.0)[:, None] * jnp.ones((1, 3))
    assert float(dirichlet_energy(v)) == pytest.approx(12.0)
    # Pairs touching a pad are excluded.
    mask = jnp.arange(5) < 3
    assert float(dirichlet_energy(v, mask)) == pytest.approx(6.0)


def test_commutator(getkey):
    dim = 8
    u = jr.normal(getkey(), (7, dim))
    mask = jnp.arange(7) < 5
    diffusion = DiffusionLayer(dim, dilations=(1, 2), init=0.3)
    # A token-wise linear map commutes with channel-uniform diffusion.
    w = jr.normal(getkey(), (dim, dim))
    comm = eqx.filter_jit(commutator)
    assert float(comm(diffusion, lambda v, m: v @ w, u, mask)) < 1e-5
    attention = pf.MultiHeadAttention(dim, 2, key=getkey())
    # Uniform attention (zero queries and keys) is mean-field, and D conserves the mean.
    uniform = eqx.tree_at(
        lambda a: a.qkv_weight, attention, attention.qkv_weight.at[:, : 2 * dim].set(0.0)
    )
    assert float(comm(diffusion, uniform, u, mask)) < 1e-5
    # Real attention does not commute with diffusion.
    sharp = eqx.tree_at(lambda a: a.qkv_weight, attention, 5.0 * attention.qkv_weight)
    assert float(comm(diffusion, sharp, u, mask)) > 1e-3


def test_model_diagnostics(getkey):
    encoder = pf.Encoder(11, 8, 2, 3, key=getkey())
    tokens = jr.randint(getkey(), (2, 6), 0, 11)
    mask = jnp.arange(6)[None, :] < jnp.asarray([6, 3])[:, None]
    profile = eqx.filter_jit(roughness_profile)(encoder, tokens, mask)
    assert profile.shape == (4,)
    assert bool(jnp.all((profile >= 0) & (profile <= 4)))
    model_commutator_jit = eqx.filter_jit(model_commutator)
    c0 = model_commutator_jit(encoder, tokens, mask, layer=0)
    c2 = model_commutator_jit(encoder, tokens, mask, layer=2)
    assert c0.shape == () and float(c0) > 0 and float(c2) > 0
    with pytest.raises(ValueError, match="layer"):
        model_commutator(encoder, tokens, mask, layer=3)
