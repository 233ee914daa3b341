"""`experiments/studies/ablations.py`: the stabilizer study's no-residual arm, built on the
public field protocol, equals a plainly written encoder whose branches replace the stream."""

import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

import pdeformer as pf
from helpers import max_abs_diff, prefix_mask
from test_reference import _case, _reference_encoder, _weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "studies"))
from ablations import NoResidual  # noqa: E402


def test_no_residual_equals_plain_encoder(getkey):
    """Each branch replaces the stream; pads keep their states."""
    field, x = _case(jnp.float32, getkey())
    lengths = [12, 7, 3]
    mask = prefix_mask(lengths, 12)
    sol = NoResidual()(field, x, mask)
    W = _weights(field)
    for b in range(x.shape[0]):
        ref = _reference_encoder(W, x[b], mask[b], 4, 1e-5, residual=False)
        n = lengths[b]
        assert max_abs_diff(sol.u[b, :n], ref[:n]) <= 1e-4 * max(1.0, float(jnp.abs(ref).max()))
        assert jnp.array_equal(sol.u[b, n:], x[b, n:])
    assert int(sol.stats.nfe) == 2 * field.num_layers


def test_no_residual_saves_per_layer_states(getkey):
    """`save_at=range(L + 1)` gives the input and each layer's output of the plain encoder."""
    field, x = _case(jnp.float32, getkey())
    lengths = [12, 7, 3]
    mask = prefix_mask(lengths, 12)
    L = field.num_layers
    sol = NoResidual()(field, x, mask, save_at=range(L + 1))
    assert sol.us.shape == (L + 1, *x.shape)
    assert jnp.array_equal(sol.us[0], x)
    assert jnp.array_equal(sol.us[-1], sol.u)
    W = _weights(field)
    for b in range(x.shape[0]):
        states = []
        hooks = {"between_layers": lambda layer, v, states=states: states.append(v) or v}
        ref = _reference_encoder(W, x[b], mask[b], 4, 1e-5, residual=False, hooks=hooks)
        states.append(ref)
        n = lengths[b]
        for layer, want in enumerate(states, start=1):
            scale = max(1.0, float(jnp.abs(want).max()))
            assert max_abs_diff(sol.us[layer, b, :n], want[:n]) <= 1e-4 * scale


def test_no_residual_refuses_saves_between_steps(getkey):
    field, x = _case(jnp.float32, getkey())
    with pytest.raises(ValueError, match=r"NoResidual saves only at multiples of its step 0\.5"):
        NoResidual()(field, x, save_at=[0.25])
    assert isinstance(NoResidual(), pf.AbstractDepth)
