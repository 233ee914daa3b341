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


def test_no_residual_refuses_saves(getkey):
    field, x = _case(jnp.float32, getkey())
    with pytest.raises(ValueError, match="final state only"):
        NoResidual()(field, x, save_at=[1.0])
    assert isinstance(NoResidual(), pf.AbstractDepth)
