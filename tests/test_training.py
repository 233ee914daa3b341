"""Training loop, checkpoints and resumption, and the CLI (the experiments: test_experiments.py)."""

import dataclasses
import json

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from helpers import tree_allclose
from pdeformer import Classifier, Continuous, DiffusionOperator, Discrete
from pdeformer.cli import ADJOINTS, integrator, parse
from pdeformer.cli import main as cli_main
from pdeformer.data import ListOpsConfig, batch_order, iterate_batches, load_task
from pdeformer.training import (
    CHECKPOINT_NAME,
    METRICS_NAME,
    NonFiniteLossError,
    TrainConfig,
    evaluate,
    make_optimizer,
    train,
    train_step,
)

# One tiny architecture and one padded length for every test, so the jitted step compiles once.
SIZES = dict(dim=16, num_heads=2, num_layers=1)
TINY = ListOpsConfig(max_depth=3, min_length=5, max_length=20, num_train=24, num_val=8, num_test=8)


@pytest.fixture(scope="module")
def task():
    return load_task("listops", config=TINY, seed=0)


def _model(task, key):
    return Classifier(task.vocab_size, num_classes=task.num_classes, key=key, **SIZES)


def _no_time(history):
    return [{k: v for k, v in r.items() if k != "time"} for r in history]


@pytest.mark.slow
def test_overfits_one_batch(task):
    small = dataclasses.replace(task, train=task.train.take(np.arange(8)))
    config = TrainConfig(
        lr=1e-2, warmup_steps=0, total_steps=80, batch_size=8, weight_decay=0.0, progress=False
    )
    model, history = train(_model(task, jr.PRNGKey(0)), small, Discrete(), config)
    assert len(history) == 80
    assert history[-1]["loss"] < 0.1 * history[0]["loss"]
    ev = evaluate(model, small.train, Discrete(), 8)
    assert ev.accuracy == 1.0
    assert ev.mean_nfe == 2.0  # one layer: two Euler steps of 1/2
    assert {"loss", "accuracy", "nfe", "grad_norm", "lr", "time"} <= set(history[0])


@pytest.mark.slow  # compiles a backward pass through diffrax: ~30 s on 2 idle cores
def test_train_step_does_not_recompile_for_a_new_tolerance(task):
    config = TrainConfig(warmup_steps=0, total_steps=4, batch_size=8, progress=False)
    optimizer = make_optimizer(config)
    model = _model(task, jr.PRNGKey(1))
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    batch = next(iterate_batches(task.train, 8, pad_to=task.train.tokens.shape[1]))
    step = eqx.debug.assert_max_traces(train_step.__wrapped__, max_traces=1)
    step = eqx.filter_jit(step)
    for rtol in (1e-2, 1e-3):
        depth = Continuous(diffrax.Bosh3(), diffrax.PIDController(rtol=rtol, atol=rtol / 10))
        _, _, metrics = step(model, opt_state, batch, depth, optimizer)
        assert np.isfinite(float(metrics["loss"]))
        assert int(metrics["nfe"]) > 0


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(task, tmp_path):
    config = TrainConfig(
        lr=3e-3, warmup_steps=2, total_steps=6, batch_size=8, checkpoint_every=3, progress=False
    )
    full_model, full = train(_model(task, jr.PRNGKey(2)), task, Discrete(), config, tmp_path / "a")

    def kill_after_step_4(step, record):
        if step == 4:
            raise KeyboardInterrupt  # a kill after step 4, whose update is never checkpointed

    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        train(
            _model(task, jr.PRNGKey(2)), task, Discrete(), config, out, callback=kill_after_step_4
        )
    assert json.loads((out / CHECKPOINT_NAME).read_text())["step"] == 3
    assert len((out / METRICS_NAME).read_text().splitlines()) == 5
    # Resume into a differently initialised template: everything must come from the checkpoint.
    model, history = train(_model(task, jr.PRNGKey(99)), task, Discrete(), config, out, resume=True)
    assert _no_time(history) == _no_time(full)
    assert [json.loads(s)["step"] for s in (out / METRICS_NAME).read_text().splitlines()] == list(
        range(6)
    )
    params = eqx.filter(model, eqx.is_inexact_array)
    full_params = eqx.filter(full_model, eqx.is_inexact_array)
    assert tree_allclose(params, full_params, rtol=0, atol=0)
    # Resuming a finished run is a no-op; a different trajectory config is refused.
    _, again = train(_model(task, jr.PRNGKey(2)), task, Discrete(), config, out, resume=True)
    assert _no_time(again) == _no_time(full)
    with pytest.raises(ValueError, match=r"cannot resume: .*lr: 0.003 -> 0.01"):
        train(
            _model(task, jr.PRNGKey(2)),
            task,
            Discrete(),
            dataclasses.replace(config, lr=1e-2),
            out,
            resume=True,
        )


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_checkpoint(task, tmp_path):
    config = TrainConfig(
        warmup_steps=0, total_steps=5, batch_size=8, checkpoint_every=1, progress=False
    )
    # Poison the examples of the second batch: an out-of-range label gives a NaN loss there.
    second = batch_order(task.train.lengths, 8, seed=config.seed, epoch=0)[1]
    labels = task.train.labels.copy()
    labels[second] = 99
    bad = dataclasses.replace(task, train=dataclasses.replace(task.train, labels=labels))
    with pytest.raises(
        NonFiniteLossError,
        match=r"non-finite loss at step 1 .*the last good checkpoint \(step 1\) is kept",
    ):
        train(_model(task, jr.PRNGKey(3)), bad, Discrete(), config, tmp_path)
    meta = json.loads((tmp_path / CHECKPOINT_NAME).read_text())
    assert meta["step"] == 1
    assert (tmp_path / meta["file"]).is_file()
    log = [json.loads(s) for s in (tmp_path / METRICS_NAME).read_text().splitlines()]
    assert log[-1]["event"] == "non_finite" and log[-1]["loss"] is None


def test_config_validation_says_the_fix():
    with pytest.raises(ValueError, match=r"warmup_steps must lie in \[0, total_steps=10\)"):
        TrainConfig(warmup_steps=20, total_steps=10)
    # The cosine schedule decays after the warm-up: a warm-up of every step is refused here,
    # not by optax when the optimiser is made.
    with pytest.raises(ValueError, match=r"warmup_steps must lie in \[0, total_steps=10\)"):
        TrainConfig(warmup_steps=10, total_steps=10)
    make_optimizer(TrainConfig(warmup_steps=9, total_steps=10))
    with pytest.raises(ValueError, match="clip_norm must be > 0"):
        TrainConfig(clip_norm=0.0)


@pytest.mark.integration  # the command line end to end: trains, checkpoints, evaluates
def test_cli_help_train_and_evaluate(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["--help"])
    assert exc.value.code == 0
    for command in ("train", "evaluate"):
        with pytest.raises(SystemExit):
            cli_main([command, "--help"])
    text = capsys.readouterr().out
    for option in ("--solver", "--rtol", "--atol", "--depth", "--resume", "--task-option"):
        assert option in text
    assert "rtol/10" in text  # the tolerance rule, in both commands' --help
    args = ["--task-option", "max_depth=3", "--task-option", "min_length=5"]
    args += ["--task-option", "max_length=20", "--task-option", "num_train=24"]
    args += ["--task-option", "num_val=8", "--task-option", "num_test=8"]
    args += ["--dim", "16", "--heads", "2", "--layers", "1", "--batch-size", "8"]
    out = tmp_path / "run"
    assert cli_main(["train", *args, "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2
    assert json.loads((out / CHECKPOINT_NAME).read_text())["step"] == 2
    assert cli_main(["evaluate", str(out), "--batch-size", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["checkpoint_step"] == 2 and result["mean_nfe"] == 2.0
    assert result["success"] == 1.0
    assert 0.0 <= result["accuracy"] <= 1.0


def test_cli_adjoint_names():
    # "recursive" is the library's default adjoint, sized by --max-steps.
    def adjoint(name, max_steps):
        argv = ["train", "--depth", "continuous", "--adjoint", name, "--out", "x"]
        return integrator(parse([*argv, "--max-steps", str(max_steps)]).integrator).adjoint

    assert sorted(ADJOINTS) == ["backsolve", "direct", "recursive"]
    assert adjoint("recursive", 4096) == diffrax.RecursiveCheckpointAdjoint(checkpoints=16)
    assert adjoint("recursive", 8) == diffrax.RecursiveCheckpointAdjoint(checkpoints=8)
    assert isinstance(adjoint("direct", 64), diffrax.DirectAdjoint)
    assert isinstance(adjoint("backsolve", 64), diffrax.BacksolveAdjoint)


def test_non_finite_outputs_count_as_failures(task):
    # NaN weights: every logit is NaN, so no batch succeeds and no example is correct.
    model = _model(task, jr.PRNGKey(4))
    nan = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), eqx.filter(model, eqx.is_inexact_array))
    broken = eqx.combine(nan, model)
    ev = evaluate(broken, task.test, Discrete(), 8)
    assert np.isnan(ev.logits).all()
    assert ev.success == 0.0 and ev.accuracy == 0.0
    # A stiff field (D = 1e10) under constant-step Euler overflows to inf and NaN.
    stiff = Classifier(
        task.vocab_size,
        num_classes=task.num_classes,
        key=jr.PRNGKey(5),
        diffusion=DiffusionOperator(SIZES["dim"], alpha_max=None, init=1e10),
        **SIZES,
    )
    euler = Continuous(diffrax.Euler(), diffrax.ConstantStepSize(), dt0=0.125)
    ev = evaluate(stiff, task.test, euler, 8)
    assert not np.isfinite(ev.logits).all()
    assert ev.success == 0.0


@pytest.mark.slow
def test_metrics_record_the_solve_success_and_nfe(task, tmp_path):
    # Two adaptive steps at a tolerance that needs many: every solve fails, quietly.
    depth = Continuous(
        diffrax.Heun(), diffrax.PIDController(rtol=1e-9, atol=1e-10), max_steps=2, throw=False
    )
    config = TrainConfig(warmup_steps=0, total_steps=2, batch_size=8, progress=False)
    _, history = train(_model(task, jr.PRNGKey(6)), task, depth, config, tmp_path)
    log = [json.loads(s) for s in (tmp_path / METRICS_NAME).read_text().splitlines()]
    assert len(log) == 2
    for record in (*history, *log):
        assert record["success"] is False
        assert isinstance(record["nfe"], int) and record["nfe"] > 0
    _, history = train(_model(task, jr.PRNGKey(6)), task, Discrete(), config)
    assert [r["success"] for r in history] == [True, True]
