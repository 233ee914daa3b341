"""Dropout as in the LRA Transformer: off without a key, the identity at rate 0, masks held
fixed in depth within one solve, the same masks under every integrator of the same pieces."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import pdeformer as pf
from helpers import prefix_mask
from pdeformer.operators.attention import attention
from pdeformer.operators.dropout import dropout
from pdeformer.training import has_dropout

EULER_HALF = pf.Continuous(diffrax.Euler(), diffrax.ConstantStepSize(), dt0=0.5)


def _inputs():
    tokens = (jnp.arange(24, dtype=jnp.int32).reshape(4, 6) * 7) % 20
    return tokens, prefix_mask([6, 5, 3, 1], 6)


def _model(rates=None, **kwargs):
    return pf.Classifier(
        20,
        8,
        2,
        2,
        3,
        key=jr.PRNGKey(0),
        dropout=None if rates is None else pf.Dropout(*rates),
        pooling=pf.ClsPooling(8, key=jr.PRNGKey(1)),
        **kwargs,
    )


@eqx.filter_jit
def _logits(model, tokens, mask, depth=None, key=None):
    return model(tokens, mask, depth=depth, key=key)[0]


def test_rate_zero_is_the_model_without_dropout_bit_for_bit():
    tokens, mask = _inputs()
    plain = _model()
    zero = _model((0.0, 0.0))
    # The same pytree (leaves and structure): checkpoints of either load into the other.
    assert jax.tree.structure(plain) == jax.tree.structure(zero)
    reference = _logits(plain, tokens, mask)
    # Under Discrete(); Euler with the discrete step is Discrete() bit for bit
    # (tests/test_reference.py), with dropout too (the slow test below).
    logits = _logits(zero, tokens, mask, pf.Discrete(), jr.PRNGKey(5))
    assert np.array_equal(logits, reference)
    assert not has_dropout(zero) and not has_dropout(plain)


def test_without_a_key_dropout_is_off():
    tokens, mask = _inputs()
    reference = _logits(_model(), tokens, mask)
    model = _model((0.3, 0.3))
    assert has_dropout(model)
    assert np.array_equal(_logits(model, tokens, mask), reference)


# A classifier solved twice (about 10 s of compiling); the default tier checks the rate's
# masks under a key (`test_masks_are_held_fixed_on_a_piece`) and `Discrete()` against Euler
# with the discrete step without dropout (tests/test_reference.py).
@pytest.mark.slow
def test_discrete_equals_continuous_euler_with_the_same_key():
    # The same key gives the same masks (in either integrator), another key other masks.
    tokens, mask = _inputs()
    model = _model((0.2, 0.3))
    key = jr.PRNGKey(7)
    d = _logits(model, tokens, mask, pf.Discrete(), key)
    c = _logits(model, tokens, mask, EULER_HALF, key)
    assert np.array_equal(d, c)
    assert np.array_equal(d, _logits(model, tokens, mask, pf.Discrete(), jr.PRNGKey(7)))
    other = _logits(model, tokens, mask, pf.Discrete(), jr.PRNGKey(8))
    off = _logits(model, tokens, mask, pf.Discrete())
    assert not np.allclose(d, other) and not np.allclose(d, off)


def test_masks_are_held_fixed_on_a_piece():
    # With per-layer weights the rate on a piece does not depend on t: with the masks drawn
    # once per piece it still does not, and it is the same at every evaluation.
    field = pf.Field(8, 2, 2, key=jr.PRNGKey(0), dropout=pf.Dropout(0.3, 0.3))
    u = jr.normal(jr.PRNGKey(1), (3, 6, 8))
    mask = prefix_mask([6, 4, 2], 6)
    rate = eqx.filter_jit(lambda f, t: f(t, u, mask))
    keyed = field.with_dropout_key(jr.PRNGKey(2))
    f = lambda t: rate(keyed, jnp.asarray(t))
    assert np.array_equal(f(0.1), f(0.1))
    assert np.array_equal(f(0.1), f(0.4))
    assert not np.allclose(f(0.1), rate(field, jnp.asarray(0.1)))
    # Another key, other masks.
    other = rate(field.with_dropout_key(jr.PRNGKey(3)), jnp.asarray(0.1))
    assert not np.allclose(f(0.1), other)
    # Pads stay frozen.
    assert np.all(f(0.1)[~mask] == 0)


def test_one_smooth_piece_has_one_set_of_masks():
    field = pf.Field(
        8,
        2,
        3,
        key=jr.PRNGKey(0),
        schedule=pf.Shared(),
        composition=pf.ParallelBlock(),
        dropout=pf.Dropout(0.3, 0.3),
    )
    assert field.pieces().count == 1
    u = jr.normal(jr.PRNGKey(1), (6, 8))
    keyed = field.with_dropout_key(jr.PRNGKey(2))
    rate = eqx.filter_jit(lambda t: keyed(t, u))
    assert np.array_equal(rate(jnp.asarray(0.2)), rate(jnp.asarray(2.7)))


@pytest.mark.slow
def test_an_adaptive_solve_with_dropout_is_deterministic_and_differentiable():
    tokens, mask = _inputs()
    model = _model((0.1, 0.1))
    depth = pf.Continuous(controller=diffrax.PIDController(rtol=1e-3, atol=1e-4))

    def loss(m):
        logits, sol = m(tokens, mask, depth=depth, key=jr.PRNGKey(4))
        return jnp.sum(logits), sol.stats.nfe

    value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))
    (a, nfe), grads = value_and_grad(model)
    (b, _), _ = value_and_grad(model)
    assert a == b and int(nfe) > 0
    assert np.all(np.isfinite(grads.head_weight))


def test_dropout_function_drops_at_the_rate_and_keeps_the_mean():
    x = jnp.ones((200_000,))
    y = dropout(x, 0.3, jr.PRNGKey(0))
    zero = float(jnp.mean(y == 0))
    assert abs(zero - 0.3) < 0.01
    assert abs(float(jnp.mean(y)) - 1.0) < 0.02
    assert np.allclose(y[y != 0], 1 / 0.7)
    assert dropout(x, 0.3, None) is x and dropout(x, 0.0, jr.PRNGKey(0)) is x


def test_attention_dropout_acts_on_the_weights():
    q, k, v = (jr.normal(key, (5, 2, 4)) for key in jr.split(jr.PRNGKey(0), 3))
    mask = jnp.arange(5) < 4
    key = jr.PRNGKey(1)
    out = attention(q, k, v, mask, implementation="blockwise", dropout_rate=0.5, key=key)
    logits = jnp.einsum("tnh,snh->nts", q, k) / 2.0
    logits = jnp.where(mask[None, None, :], logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
    keep = jr.bernoulli(key, 0.5, weights.shape)
    expected = jnp.einsum("nts,snh->tnh", jnp.where(keep, weights / 0.5, 0.0), v)
    assert np.allclose(out, expected, atol=1e-6)
    plain = attention(q, k, v, mask, implementation="blockwise")
    assert np.allclose(attention(q, k, v, mask, dropout_rate=0.5), plain)


def test_rates_are_checked():
    with pytest.raises(ValueError, match=r"Dropout rate must be a number in \[0, 1\); got rate=1"):
        pf.Dropout(1.0)
    with pytest.raises(ValueError, match=r"attention_rate=-0.1"):
        pf.Dropout(0.1, -0.1)


@pytest.mark.slow
def test_train_step_draws_masks_only_with_a_key():
    from pdeformer.data import Batch
    from pdeformer.training import TrainConfig, make_optimizer, train_step

    tokens, mask = _inputs()
    batch = Batch(np.asarray(tokens), np.asarray(mask), np.array([0, 1, 2, 0], np.int32))
    model = _model((0.3, 0.3))
    optimizer = make_optimizer(TrainConfig(warmup_steps=0, total_steps=10))
    state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = lambda key: train_step(model, state, batch, pf.Discrete(), optimizer, key=key)[2]
    a, b, none = step(jr.PRNGKey(0)), step(jr.PRNGKey(1)), step(None)
    assert float(a["loss"]) != float(b["loss"])
    reference = _logits(_model(), tokens, mask)
    labels = jnp.asarray(batch.labels)
    import optax

    plain = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(reference, labels))
    assert float(none["loss"]) == pytest.approx(float(plain), rel=1e-6)
