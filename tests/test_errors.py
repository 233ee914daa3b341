"""Bad input and bad configuration fail early with messages that say what to pass."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import pdeformer as pf


@pytest.fixture
def field(getkey):
    return pf.Field(8, 2, 2, key=getkey())


def test_state_rank_and_dtype(field):
    with pytest.raises(TypeError, match=r"shape \(\*batch, seq, dim\)"):
        pf.Discrete()(field, jnp.zeros(8))
    with pytest.raises(TypeError, match="floating point"):
        pf.Discrete()(field, jnp.zeros((3, 8), jnp.int32))
    with pytest.raises(TypeError, match="mask must have shape"):
        pf.Discrete()(field, jnp.zeros((2, 3, 8)), jnp.ones((3,), bool))
    with pytest.raises(TypeError, match="mask must be boolean"):
        pf.Continuous()(field, jnp.zeros((3, 8)), jnp.ones((3,), jnp.int32))


def test_wrong_width_is_a_type_error(field):
    # beartype + jaxtyping (active in the tests) reject a channel axis that does not
    # match the weights before any arithmetic happens.
    with pytest.raises(TypeError):
        field(0.0, jnp.zeros((3, 5)))


def test_classifier_tokens(getkey):
    model = pf.Classifier(10, 8, 2, 1, 3, key=getkey())
    with pytest.raises(TypeError):
        model(jnp.zeros((2, 5), jnp.float32))
    # The library's own check or the jaxtyping hook (in the tests) may answer first; both
    # name the mask.
    with pytest.raises(TypeError, match="mask"):
        model(jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 4), bool))


def test_invalid_configuration(getkey):
    with pytest.raises(ValueError, match="num_heads must divide dim.*divisors of 10"):
        pf.Field(10, 3, 2, key=getkey())
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        pf.Field(8, 2, 0, key=getkey())
    with pytest.raises(ValueError, match="rtol must be >= 0.*Pass e.g."):
        pf.Continuous(controller=diffrax.PIDController(rtol=-1e-3, atol=1e-6))
    with pytest.raises(ValueError, match="atol must be >= 0"):
        pf.Continuous(controller=diffrax.PIDController(rtol=1e-3, atol=-1.0))
    with pytest.raises(ValueError, match=r"alpha_max must lie in \(0, 1/2\)"):
        pf.DiffusionOperator(8, alpha_max=0.5)
    with pytest.raises(ValueError, match="dilations"):
        pf.DiffusionOperator(8, dilations=(0,))
    with pytest.raises(ValueError, match="max_steps must be a positive int"):
        pf.Continuous(max_steps=0)
    # The library's own check or the jaxtyping hook (in the tests) may answer first.
    with pytest.raises((TypeError, ValueError), match="adjoint"):
        pf.Continuous(adjoint="backsolve")
    with pytest.raises(ValueError, match="cannot count vector-field evaluations"):
        pf.Continuous(diffrax.Kvaerno5())
    with pytest.raises(ValueError, match="dt0 must divide"):
        pf.Continuous(diffrax.Euler(), diffrax.ConstantStepSize(), dt0=0.3)(
            pf.Field(8, 2, 2, key=getkey()), jnp.zeros((3, 8))
        )
    with pytest.raises(ValueError, match="save_at must be"):
        pf.Discrete()(pf.Field(8, 2, 2, key=getkey()), jnp.zeros((3, 8)), save_at=[5.0])


def test_max_steps_too_small(field, getkey):
    u0 = jr.normal(getkey(), (4, 8))
    depth = pf.Continuous(controller=diffrax.PIDController(rtol=1e-8, atol=1e-8), max_steps=2)
    with pytest.raises(eqx.EquinoxRuntimeError, match="max_steps"):
        depth(field, u0)


@pytest.mark.slow  # another solve to compile; the default tier checks the error above
def test_max_steps_too_small_without_throwing(field, getkey):
    u0 = jr.normal(getkey(), (4, 8))
    quiet = pf.Continuous(
        controller=diffrax.PIDController(rtol=1e-8, atol=1e-8), max_steps=2, throw=False
    )
    sol = quiet(field, u0)
    assert not bool(sol.stats.success)
    assert int(sol.stats.num_steps) == 2


def test_default_adjoint_checkpoints():
    # 16 checkpoints, never more than the step budget (diffrax's own default would keep
    # about sqrt(2 max_steps), 90 at 4096).
    assert pf.Continuous().adjoint == diffrax.RecursiveCheckpointAdjoint(checkpoints=16)
    assert pf.Continuous(max_steps=4).adjoint == diffrax.RecursiveCheckpointAdjoint(checkpoints=4)
    back = diffrax.BacksolveAdjoint()
    assert pf.Continuous(adjoint=back).adjoint is back
    assert pf.ExponentialContinuous().adjoint == diffrax.RecursiveCheckpointAdjoint(checkpoints=16)


def test_diffusion_operator_large_init_is_stable():
    # The inverse softplus of 1000 overflowed as log(expm1(1000)).
    op = pf.DiffusionOperator(16, alpha_max=None, init=1000.0)
    assert jnp.allclose(op.total(), 1000.0)
    with jax.enable_x64(True):
        for init in (1e-6, 0.1, 3.0, 50.0):
            total = pf.DiffusionOperator(4, alpha_max=None, init=init, dtype=jnp.float64).total()
            assert jnp.allclose(total, init, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="init must be > 0 and finite; got init=inf"):
        pf.DiffusionOperator(4, alpha_max=None, init=float("inf"))
