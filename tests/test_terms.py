"""User terms with their own per-layer weights (`pf.AbstractLayerTerm`), added to the field
without editing the library."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import pdeformer as pf
from helpers import prefix_mask


class Scale(pf.AbstractLayerTerm):
    """`c(u) = w * u` per channel, with its own weights per depth node."""

    weight: jax.Array

    def __init__(self, dim, *, key, dtype=jnp.float32):
        self.weight = 0.1 * jr.normal(key, (dim,), dtype)

    def __call__(self, u, mask):
        return self.weight * u


@pytest.mark.parametrize(
    "schedule,nodes", [(pf.PerLayer(), 3), (pf.Shared(), 1), (pf.Interpolated(), 4)]
)
def test_terms_are_stacked_per_depth_node(getkey, schedule, nodes):
    key = getkey()
    field = pf.Field(8, 2, 3, key=key, schedule=schedule, terms=(Scale,))
    assert field.blocks.terms[0].weight.shape == (nodes, 8)
    # Adding a term leaves the other weights as they were.
    plain = pf.Field(8, 2, 3, key=key, schedule=schedule)
    assert jnp.array_equal(field.blocks.attention.qkv_weight, plain.blocks.attention.qkv_weight)


def test_term_acts_beside_the_ffn(getkey):
    """Under `Discrete()` a layer is `u + A(N u)`, then `+ R(N' u) + c(u)`; Euler with the
    discrete step is still `Discrete()` bit for bit; gradients reach every layer's term."""
    field = pf.Field(8, 2, 2, key=getkey(), terms=(Scale,))
    x = jr.normal(getkey(), (2, 6, 8))
    mask = prefix_mask([6, 4], 6)
    euler = pf.Continuous(diffrax.Euler(), diffrax.ConstantStepSize(), dt0=0.5)
    out = jax.jit(lambda f: pf.Discrete()(f, x, mask).u)(field)

    @eqx.filter_jit  # one program, not op by op
    def written_out(field):
        ref = x
        for layer in range(2):
            blk = jax.tree.map(lambda a, i=layer: a[i], field.blocks)
            ref = ref + blk.attend(ref, mask)
            ref = ref + blk.reaction(jax.vmap(blk.reaction_norm)(ref)) + blk.terms[0].weight * ref
            ref = jnp.where(mask[..., None], ref, x)
        return ref

    ref = written_out(field)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    b = jax.jit(lambda f: euler(f, x, mask).u)(field)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(b))
    # Through diffrax's fixed-step loop: a backward pass through an adaptive solve would
    # compile for long and reach the same weights through the same rate.
    grads = eqx.filter_jit(eqx.filter_grad(lambda f: jnp.sum(euler(f, x, mask).u ** 2)))(field)
    assert bool(jnp.all(jnp.abs(grads.blocks.terms[0].weight).sum(-1) > 0))
