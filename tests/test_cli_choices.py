"""The command line's choices of model (schedule, composition) and of regularisers: parsed
in-process and mapped to objects by `field_options` and `integrator`."""

import diffrax
import pytest

import pdeformer as pf
from pdeformer.cli import COMPOSITIONS, SCHEDULES, field_options, integrator, parse


def _train(*args):
    return parse(["train", "--out", "x", *args])


def test_schedule_and_composition_names():
    assert sorted(SCHEDULES) == ["interpolated", "per-layer", "polynomial", "shared"]
    assert sorted(COMPOSITIONS) == ["parallel", "sequential"]
    default = field_options(_train().model)
    assert default == {"schedule": pf.PerLayer(), "composition": pf.SequentialBlock()}
    options = field_options(
        _train("--schedule", "polynomial", "--degree", "2", "--composition", "parallel").model
    )
    assert options == {"schedule": pf.Polynomial(2), "composition": pf.ParallelBlock()}
    for name, schedule in (
        ("per-layer", pf.PerLayer()),
        ("shared", pf.Shared()),
        ("interpolated", pf.Interpolated()),
    ):
        assert field_options(_train("--schedule", name).model)["schedule"] == schedule
    # Polynomial's default degree.
    assert field_options(_train("--schedule", "polynomial").model)["schedule"] == pf.Polynomial(3)
    with pytest.raises(ValueError, match=r"--degree must be >= 0; got -1"):
        _train("--schedule", "polynomial", "--degree", "-1")


def test_regulariser_weights():
    assert integrator(_train().integrator) == pf.Discrete()
    depth = integrator(_train("--kinetic-energy", "0.1", "--jacobian-frobenius", "0.01").integrator)
    assert depth == pf.Discrete(regularisers=(pf.KineticEnergy(0.1), pf.JacobianFrobenius(0.01)))
    args = ("--depth", "continuous", "--rtol", "1e-2", "--error-estimate", "0.5")
    depth = integrator(_train(*args, "--kinetic-energy", "0.2").integrator)
    assert isinstance(depth, pf.Continuous) and isinstance(depth.solver, diffrax.Tsit5)
    assert [type(r) for r in depth.regularisers] == [pf.KineticEnergy, pf.ErrorEstimate]
    assert [float(r.weight) for r in depth.regularisers] == pytest.approx([0.2, 0.5])
    fixed = ("--depth", "continuous", "--step-size", "0.25", "--kinetic-energy", "1")
    assert len(integrator(_train(*fixed).integrator).regularisers) == 1
    with pytest.raises(ValueError, match=r"--kinetic-energy must be >= 0 \(0: none\); got -1.0"):
        _train("--kinetic-energy", "-1")
    with pytest.raises(ValueError, match="--error-estimate penalises an adaptive solver's error"):
        _train("--error-estimate", "1")
    with pytest.raises(ValueError, match="needs --depth continuous without --step-size; got "):
        _train("--depth", "continuous", "--step-size", "0.5", "--error-estimate", "1")
