"""`diagnostics.evaluation_counts`: the field's evaluations in a gradient, by pass."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import pdeformer as pf
from pdeformer.diagnostics import EvaluationCounts, evaluation_counts


def _field_and_state():
    field = pf.Field(8, 2, 2, key=jr.PRNGKey(0))
    u0 = jr.normal(jr.PRNGKey(1), (4, 8))
    return field, u0


def _loss(depth):
    return lambda field, u0: jnp.sum(depth(field, u0).u ** 2)


def _nfe(depth, field, u0):
    return int(depth(field, u0).stats.nfe)


# Over 16 steps: dtmax bounds the steps of the adaptive solve below.
_LONG = diffrax.PIDController(rtol=1e-3, atol=1e-4, dtmax=0.05)


@pytest.mark.parametrize(
    "depth",
    [pf.Discrete(), pf.Continuous(diffrax.Euler(), diffrax.ConstantStepSize())],
    ids=["discrete", "continuous_euler"],
)
def test_euler_steps_recompute_nothing(depth):
    # Two layers of two pieces each: four Euler steps, each one rate and one VJP. The
    # norms that Field checkpoints are recomputed inside a VJP, not as an evaluation.
    field, u0 = _field_and_state()
    counts = evaluation_counts(_loss(depth), field, u0)
    assert counts == EvaluationCounts(forward=4, backward_recomputed=0, backward_vjp=4)
    assert counts.forward == _nfe(depth, field, u0)


@pytest.mark.slow
def test_counting_leaves_value_and_gradient_unchanged():
    # The counting copy must compute the same function and the same gradient.
    from pdeformer.diagnostics import _Counted

    field, u0 = _field_and_state()
    depth = pf.Continuous(diffrax.Tsit5(), diffrax.PIDController(rtol=1e-3, atol=1e-4))
    counted = eqx.tree_at(lambda f: f.composition, field, _Counted(field.composition, print))
    grad = eqx.filter_value_and_grad(_loss(depth))
    (v0, g0), (v1, g1) = grad(field, u0), grad(counted, u0)
    jax.effects_barrier()
    assert float(v1) == float(v0)
    for a, b in zip(
        jax.tree.leaves(eqx.filter(g0, eqx.is_array)),
        jax.tree.leaves(eqx.filter(g1, eqx.is_array)),
        strict=True,
    ):
        assert jnp.allclose(a, b, rtol=1e-6, atol=1e-7)


# Compiles adaptive solves under value_and_grad with counting callbacks: the slow tier.
@pytest.mark.slow
def test_adaptive_forward_is_nfe_and_checkpoints_bound_recomputation():
    field, u0 = _field_and_state()
    short = pf.Continuous(diffrax.Tsit5(), _LONG)  # default adjoint: 16 checkpoints
    assert isinstance(short.adjoint, diffrax.RecursiveCheckpointAdjoint)
    steps = int(short(field, u0).stats.num_steps)
    assert steps > 16
    many = pf.Continuous(
        diffrax.Tsit5(), _LONG, diffrax.RecursiveCheckpointAdjoint(checkpoints=steps + 1)
    )
    c16 = evaluation_counts(_loss(short), field, u0)
    call = evaluation_counts(_loss(many), field, u0)
    assert c16.forward == call.forward == _nfe(short, field, u0)
    # Every step is differentiated once; with fewer checkpoints than steps some steps
    # are run again from a checkpoint first.
    assert c16.backward_vjp == call.backward_vjp > 0
    assert c16.backward_recomputed > call.backward_recomputed > 0


# Compiles adaptive solves under value_and_grad with counting callbacks: the slow tier.
@pytest.mark.slow
def test_backsolve_evaluates_once_per_vjp():
    # The backward solve takes one jax.vjp of the rate per evaluation of its dynamics:
    # one evaluation and one VJP each, none of them the forward solve's.
    field, u0 = _field_and_state()
    depth = pf.Continuous(
        diffrax.Tsit5(), diffrax.PIDController(rtol=1e-3, atol=1e-4), diffrax.BacksolveAdjoint()
    )
    counts = evaluation_counts(_loss(depth), field, u0)
    assert counts.forward == _nfe(depth, field, u0)
    assert counts.backward_recomputed == counts.backward_vjp > 0


def test_a_model_without_a_field_is_refused():
    with pytest.raises(ValueError, match="model must hold a Field"):
        evaluation_counts(lambda m, x: jnp.sum(m * x), jnp.ones(3), jnp.ones(3))
