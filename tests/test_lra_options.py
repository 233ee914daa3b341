"""The LRA Transformer's options outside the field: the MLP head, the rsqrt learning-rate
schedule with Adam's (0.9, 0.98, 1e-9), and their command-line names (run.json included)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import pdeformer as pf
from pdeformer.cli import model_options, parse, read_run, write_run
from pdeformer.training import TrainConfig, make_optimizer, rsqrt_schedule


def test_mlp_head_is_dense_relu_dense():
    model = pf.Classifier(20, 8, 2, 1, 3, key=jr.PRNGKey(0), head="mlp", mlp_dim=12)
    assert model.head == "mlp" and model.mlp_weight.shape == (8, 12)
    assert model.head_weight.shape == (12, 3)
    tokens = jnp.arange(10, dtype=jnp.int32).reshape(2, 5)
    logits, features = eqx.filter_jit(lambda m: (m(tokens)[0], m.encoder(tokens)[0]))(model)
    hidden = jnp.maximum(features @ model.mlp_weight + model.mlp_bias, 0)
    assert np.allclose(logits, hidden @ model.head_weight + model.head_bias, atol=1e-6)
    # The linear head is the model as it was: the same leaves as before heads were named.
    linear = pf.Classifier(20, 8, 2, 1, 3, key=jr.PRNGKey(0))
    assert linear.head == "linear" and linear.mlp_weight is None
    assert len(jax.tree.leaves(linear)) == len(jax.tree.leaves(linear.encoder)) + 2


def test_head_options_are_checked():
    with pytest.raises(ValueError, match=r"head must be one of \('linear', 'mlp'\); got head='x'"):
        pf.Classifier(20, 8, 2, 1, 3, key=jr.PRNGKey(0), head="x")
    with pytest.raises(ValueError, match="got mlp_dim=4 with head='linear'. Pass head='mlp'"):
        pf.Classifier(20, 8, 2, 1, 3, key=jr.PRNGKey(0), mlp_dim=4)


def test_rsqrt_schedule_follows_the_formula():
    lr, w = 0.05, 1000
    schedule = make_optimizer(
        TrainConfig(lr=lr, warmup_steps=w, total_steps=5000, schedule="rsqrt")
    ).schedule()
    for t in (0, 1, 10, 500, 999, 1000, 1001, 4000, 4999, 20_000):
        expected = lr * min(1.0, t / w) / np.sqrt(max(t, w))
        assert float(schedule(t)) == pytest.approx(expected, rel=1e-6)
    assert float(schedule(w)) == pytest.approx(0.05 / np.sqrt(1000))  # the peak, ~1.58e-3
    assert float(rsqrt_schedule(1.0, 4)(16)) == pytest.approx(0.25)
    # Retrieval's configuration: a warm-up longer than the run is allowed with rsqrt.
    TrainConfig(warmup_steps=8000, total_steps=5000, schedule="rsqrt")


def test_schedule_and_adam_settings_are_checked():
    with pytest.raises(ValueError, match="warmup_steps must be >= 1; got warmup_steps=0"):
        TrainConfig(warmup_steps=0, schedule="rsqrt")
    with pytest.raises(ValueError, match=r"b2 must lie in \[0, 1\); got b2=1.0"):
        TrainConfig(b2=1.0)
    with pytest.raises(ValueError, match="eps must be > 0"):
        TrainConfig(eps=0.0)


def test_adam_constants_reach_the_update():
    params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]])}
    grads = {"w": jnp.array([[0.1, 0.2], [-0.3, 0.4]])}
    config = TrainConfig(
        lr=0.05,
        warmup_steps=2,
        total_steps=4,
        schedule="rsqrt",
        b1=0.9,
        b2=0.98,
        eps=1e-9,
        weight_decay=0.1,
        clip_norm=1e9,
    )
    optimizer = make_optimizer(config)
    reference = optax.adamw(rsqrt_schedule(0.05, 2), b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.1)
    state, ref_state = optimizer.init(params), reference.init(params)
    with jax.numpy_dtype_promotion("standard"):
        for _ in range(3):
            updates, state = optimizer.update(grads, state, params)
            ref_updates, ref_state = reference.update(grads, ref_state, params)
            assert np.allclose(updates["w"], ref_updates["w"], rtol=1e-6, atol=1e-9)


def _train(*args):
    return parse(["train", "--out", "x", *args])


def test_cli_names_of_the_lra_options(tmp_path):
    command = parse(
        [
            "train",
            "--out",
            str(tmp_path),
            "--pooling",
            "cls",
            "--head",
            "mlp",
            "--dropout",
            "0.1",
            "--attention-dropout",
            "0.2",
            "--lr-schedule",
            "rsqrt",
            "--lr",
            "0.05",
            "--warmup",
            "10",
            "--steps",
            "5",
            "--b2",
            "0.98",
            "--eps",
            "1e-9",
        ]
    )
    config = command.optim.train_config()
    assert (config.schedule, config.b2, config.eps, config.warmup_steps) == (
        "rsqrt",
        0.98,
        1e-9,
        10,
    )
    options = model_options(command.model, dual=False, max_len=12, key=jr.PRNGKey(0))
    assert isinstance(options["pooling"], pf.ClsPooling)
    assert options["dropout"] == pf.Dropout(0.1, 0.2)
    assert options["head"] == "mlp" and options["mlp_dim"] == 4 * command.model.dim
    learned = model_options(
        _train("--positions", "learned", "--head-dim", "7", "--head", "mlp").model,
        dual=False,
        max_len=12,
        key=jr.PRNGKey(0),
    )
    assert learned["positions"].table.shape == (12, 64) and learned["mlp_dim"] == 7
    assert "dropout" not in learned and "pooling" not in learned
    # run.json is the command serialised: resume and evaluate rebuild the same model.
    write_run(command)
    assert read_run(tmp_path) == command
    with pytest.raises(ValueError, match=r"--dropout must lie in \[0, 1\); got 1.0"):
        _train("--dropout", "1")
    with pytest.raises(ValueError, match="--warmup must be >= 1 with --lr-schedule rsqrt"):
        _train("--lr-schedule", "rsqrt", "--warmup", "0")


def test_cli_builds_the_lra_model(tmp_path):
    from pdeformer.cli import _build

    command = _train(
        "--pooling",
        "cls",
        "--head",
        "mlp",
        "--head-dim",
        "6",
        "--dropout",
        "0.1",
        "--dim",
        "8",
        "--heads",
        "2",
        "--layers",
        "1",
        "--task-option",
        "max_depth=2",
        "--task-option",
        "min_length=5",
        "--task-option",
        "max_length=12",
        "--task-option",
        "num_train=8",
        "--task-option",
        "num_val=4",
        "--task-option",
        "num_test=4",
    )
    _, model = _build(command.data, command.model)
    assert isinstance(model.encoder.pooling, pf.ClsPooling)
    assert model.head == "mlp" and model.mlp_weight.shape == (8, 6)
    assert model.encoder.dropout == pf.Dropout(0.1, 0.0)
    # The defaults build the model as before the options existed.
    _, plain = _build(command.data, _train("--dim", "8", "--heads", "2", "--layers", "1").model)
    _, again = _build(command.data, _train("--dim", "8", "--heads", "2", "--layers", "1").model)
    assert eqx.tree_equal(plain, again) and plain.head == "linear"
