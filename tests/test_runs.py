"""Run directories: checkpoints, resumption, the CLI's config objects and its errors."""

import dataclasses
import hashlib
import json
import os
import re
import stat
import typing
from pathlib import Path

import diffrax
import equinox as eqx
import jax.random as jr
import pytest

import pdeformer as pf
from pdeformer import cli
from pdeformer.cli import (
    RUN_NAME,
    DataConfig,
    DepthConfig,
    ModelConfig,
    OptimConfig,
    TrainCommand,
    integrator,
    parse,
    read_run,
    write_run,
)
from pdeformer.data import TASK_NAMES, ListOpsConfig, load_task
from pdeformer.training import (
    CHECKPOINT_NAME,
    METRICS_NAME,
    CorruptCheckpointError,
    TrainConfig,
    load_checkpoint,
    make_optimizer,
    save_checkpoint,
    train,
)

SIZES = dict(dim=16, num_heads=2, num_layers=1)
TINY = ListOpsConfig(max_depth=3, min_length=5, max_length=20, num_train=24, num_val=8, num_test=8)
TASK_ARGS = [
    *("--task-option", "max_depth=3", "--task-option", "min_length=5"),
    *("--task-option", "max_length=20", "--task-option", "num_train=24"),
    *("--task-option", "num_val=8", "--task-option", "num_test=8"),
    *("--dim", "16", "--heads", "2", "--layers", "1", "--batch-size", "8", "--no-progress"),
]


@pytest.fixture(scope="module")
def task():
    return load_task("listops", config=TINY, seed=0)


def _model(task):
    return pf.Classifier(task.vocab_size, num_classes=task.num_classes, key=jr.PRNGKey(0), **SIZES)


def _no_time(history):
    return [{k: v for k, v in r.items() if k != "time"} for r in history]


def _snapshot(directory):
    """Every file's bytes and modification time: equal snapshots mean nothing changed."""
    return {
        p.name: (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A two-step run of `pdeformer train` (dim 16), checkpointed at step 2."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert cli.main(["train", *TASK_ARGS, "--steps", "2", "--out", str(out)]) == 0
    return out


def _error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pdeformer: error: ")
    return lines[0].removeprefix("pdeformer: error: ")


# ---------------------------------------------------------------------------------------
# The config objects and run.json
# ---------------------------------------------------------------------------------------


def test_parse_into_config_dataclasses_and_run_json_round_trip(tmp_path):
    command = parse(
        [
            "train",
            *("--out", str(tmp_path), "--dim", "32", "--heads", "4", "--depth", "continuous"),
            *("--solver", "bosh3", "--rtol", "1e-2", "--task-option", "num_train=64"),
            *(
                "--diffusion-at",
                "after_embedding",
                "before_head",
                "--diffusion-dilations",
                "1",
                "2",
            ),
            *("--lr", "3e-4", "--data-seed", "5", "--no-progress"),
        ]
    )
    assert isinstance(command, TrainCommand)
    assert command.model == ModelConfig(
        dim=32, heads=4, diffusion_at=("after_embedding", "before_head"), diffusion_dilations=(1, 2)
    )
    assert command.integrator == DepthConfig(depth="continuous", solver="bosh3", rtol=1e-2)
    assert command.data == DataConfig(task_option=("num_train=64",), data_seed=5)
    assert command.optim == OptimConfig(lr=3e-4)
    assert command.progress is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        command.out = tmp_path  # type: ignore[misc]
    path = write_run(command)
    assert path == tmp_path / RUN_NAME
    record = json.loads(path.read_text())
    assert record["format"] == cli.RUN_FORMAT
    assert record["command"]["model"]["diffusion_at"] == ["after_embedding", "before_head"]
    assert record["command"]["integrator"]["rtol"] == 1e-2
    assert read_run(tmp_path) == command
    evaluate = parse(["evaluate", str(tmp_path), "--split", "val", "--solver", "dopri5"])
    assert evaluate.run == tmp_path and evaluate.split == "val"
    assert evaluate.integrator.solver == "dopri5"


def test_run_json_of_the_first_format_still_reads(tmp_path):
    # The flat run.json the command line wrote before the config dataclasses.
    first = {
        "task": "listops",
        "data_dir": None,
        "task_options": {"max_length": 20, "num_train": 24, "seed": 3},
        "dim": 16,
        "heads": 2,
        "layers": 1,
        "hidden": None,
        "model_seed": 0,
        "diffusion_at": ["after_embedding"],
        "diffusion_dilations": [1, 2],
        "diffusion_adaptive": False,
        "train_config": dataclasses.asdict(TrainConfig(total_steps=2, warmup_steps=0)),
        "devices": 1,
    }
    (tmp_path / RUN_NAME).write_text(json.dumps(first))
    command = read_run(tmp_path)
    assert command.data == DataConfig(task_option=("max_length=20", "num_train=24"), data_seed=3)
    assert command.data.task_options() == {"max_length": 20, "num_train": 24, "seed": 3}
    assert command.model == ModelConfig(
        dim=16, heads=2, layers=1, diffusion_at=("after_embedding",), diffusion_dilations=(1, 2)
    )
    assert command.optim.train_config(progress=True) == TrainConfig(total_steps=2, warmup_steps=0)
    (tmp_path / RUN_NAME).write_text('{"format": 1, "command": {"modl": {}}}')
    with pytest.raises(ValueError, match=r"run\.json is corrupt or from another version"):
        read_run(tmp_path)


def test_task_names_are_the_data_packages():
    assert typing.get_args(cli._TaskName) == TASK_NAMES


def test_tolerance_rule_atol_is_rtol_over_10():
    depth = integrator(DepthConfig(depth="continuous", rtol=1e-2))
    assert float(depth.controller.rtol) == pytest.approx(1e-2)
    assert float(depth.controller.atol) == pytest.approx(1e-3)
    depth = integrator(DepthConfig(depth="continuous", rtol=1e-2, atol=1e-6))
    assert float(depth.controller.atol) == pytest.approx(1e-6)
    assert integrator(DepthConfig()) == pf.Discrete()


def test_task_option_of_the_wrong_type_names_option_and_type():
    with pytest.raises(
        ValueError, match=r"max_length wants an integer; got '4e1'\. Pass e\.g\. max_length=40"
    ):
        DataConfig(task_option=("max_length=4e1",)).task_options()
    with pytest.raises(ValueError, match=r"op_prob wants a number; got 'x'"):
        DataConfig(task_option=("op_prob=x",)).task_options()
    with pytest.raises(
        ValueError, match=r"has no option 'maxlength'; its options are .*max_length"
    ):
        DataConfig(task_option=("maxlength=40",)).task_options()
    options = DataConfig(
        task_option=("max_length=40", "op_prob=0.5", "unique=false")
    ).task_options()
    assert options == {"max_length": 40, "op_prob": 0.5, "unique": False, "seed": 0}
    official = DataConfig(data_dir=Path(os.devnull), task_option=("max_length=none",))
    assert official.task_options() == {"max_length": None}


def test_config_dataclasses_refuse_bad_values():
    with pytest.raises(ValueError, match=r"--heads must divide --dim=10; got --heads 3\. Pass one"):
        ModelConfig(dim=10, heads=3)
    with pytest.raises(ValueError, match=r"--lr must be > 0; got -1"):
        OptimConfig(lr=-1.0)
    with pytest.raises(ValueError, match=r"--rtol must be > 0"):
        DepthConfig(rtol=0.0)


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------


@pytest.fixture
def checkpoint(task, tmp_path):
    model = _model(task)
    config = TrainConfig(total_steps=4, warmup_steps=0, progress=False)
    opt_state = make_optimizer(config).init(eqx.filter(model, eqx.is_inexact_array))
    save_checkpoint(tmp_path, model, opt_state, 3, config)
    return tmp_path, model, opt_state


def _flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated_eqx": lambda d: (d / "ckpt-00000003.eqx").write_bytes(
        (d / "ckpt-00000003.eqx").read_bytes()[:100]
    ),
    "random_eqx": lambda d: (d / "ckpt-00000003.eqx").write_bytes(os.urandom(5000)),
    "empty_eqx": lambda d: (d / "ckpt-00000003.eqx").write_bytes(b""),
    "flipped_bit_eqx": lambda d: _flip_a_bit(d / "ckpt-00000003.eqx"),
    "missing_eqx": lambda d: (d / "ckpt-00000003.eqx").unlink(),
    "truncated_json": lambda d: (d / CHECKPOINT_NAME).write_text(
        (d / CHECKPOINT_NAME).read_text()[:40]
    ),
    "random_json": lambda d: (d / CHECKPOINT_NAME).write_bytes(b"\xff\xfe" + os.urandom(64)),
    "missing_file_key": lambda d: (d / CHECKPOINT_NAME).write_text(
        json.dumps(
            {k: v for k, v in json.loads((d / CHECKPOINT_NAME).read_text()).items() if k != "file"}
        )
    ),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_checkpoint_names_the_file(checkpoint, corruption):
    out, model, opt_state = checkpoint
    CORRUPTIONS[corruption](out)
    name = CHECKPOINT_NAME if "json" in corruption or "key" in corruption else "ckpt-00000003"
    with pytest.raises(CorruptCheckpointError, match=rf"{name}.*corrupt|corrupt.*{name}") as exc:
        load_checkpoint(out, model, opt_state)
    assert str(out) in str(exc.value)


def test_checkpoint_stores_its_checksum(checkpoint):
    out, model, opt_state = checkpoint
    meta = json.loads((out / CHECKPOINT_NAME).read_text())
    assert meta["sha256"] == hashlib.sha256((out / meta["file"]).read_bytes()).hexdigest()
    loaded, _, _ = load_checkpoint(out, model, opt_state)
    assert eqx.tree_equal(loaded, model)


def test_checkpoint_without_checksum_still_detects_a_corrupt_file(checkpoint):
    # Checkpoints written before checksums: a file that does not deserialise is corrupt.
    out, model, opt_state = checkpoint
    meta = json.loads((out / CHECKPOINT_NAME).read_text())
    del meta["sha256"]
    (out / CHECKPOINT_NAME).write_text(json.dumps(meta))
    assert eqx.tree_equal(load_checkpoint(out, model, opt_state)[0], model)
    (out / meta["file"]).write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match=r"ckpt-00000003\.eqx is corrupt"):
        load_checkpoint(out, model, opt_state)


def test_directory_is_fsynced_after_the_rename(checkpoint, monkeypatch):
    out, model, opt_state = checkpoint
    synced = []
    fsync = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    save_checkpoint(out, model, opt_state, 4, TrainConfig(total_steps=4, warmup_steps=0))
    # file, directory (the .eqx), file, directory (checkpoint.json)
    assert synced == [False, True, False, True]


# ---------------------------------------------------------------------------------------
# Resumption
# ---------------------------------------------------------------------------------------

CONFIG = TrainConfig(
    lr=3e-3, warmup_steps=2, total_steps=6, batch_size=8, checkpoint_every=3, progress=False
)


def _interrupted(task, out):
    def kill_after_step_4(step, record):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_model(task), task, pf.Discrete(), CONFIG, out, callback=kill_after_step_4)


def test_partial_last_log_line_is_dropped_and_stale_temporaries_removed(task, tmp_path):
    _, full = train(_model(task), task, pf.Discrete(), CONFIG, tmp_path / "full")
    out = tmp_path / "run"
    _interrupted(task, out)
    with open(out / METRICS_NAME, "a") as f:
        f.write('{"step": 5, "accuracy": 0.1, "gra')  # a kill in the middle of a write
    stale = [out / ".ckpt-00000006.eqx.k3j2h1g0.tmp", out / ".checkpoint.json.a1b2c3d4.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    unrelated = out / "notes.tmp"
    unrelated.write_text("mine")
    _, history = train(_model(task), task, pf.Discrete(), CONFIG, out, resume=True)
    assert _no_time(history) == _no_time(full)
    assert not any(p.exists() for p in stale)
    assert unrelated.exists()
    lines = (out / METRICS_NAME).read_text().splitlines()
    assert [json.loads(s)["step"] for s in lines] == list(range(6))


def test_resume_refuses_other_data_or_integrator(task, tmp_path):
    out = tmp_path / "run"
    _interrupted(task, out)
    before = _snapshot(out)
    other_data = load_task("listops", config=TINY, seed=7)
    with pytest.raises(ValueError, match=r"cannot resume: .*training data: other examples"):
        train(_model(task), other_data, pf.Discrete(), CONFIG, out, resume=True)
    continuous = pf.Continuous(diffrax.Euler(), diffrax.ConstantStepSize(), dt0=0.5)
    with pytest.raises(ValueError, match=r"cannot resume: .*depth: Discrete\(\) -> Continuous"):
        train(_model(task), task, continuous, CONFIG, out, resume=True)
    assert _snapshot(out) == before


def test_failed_resume_changes_nothing_in_the_run_directory(task, tmp_path):
    out = tmp_path / "run"
    _interrupted(task, out)
    (out / ".checkpoint.json.zz9.tmp").write_text("stale")
    before = _snapshot(out)
    wider = pf.Classifier(task.vocab_size, 32, 2, 1, task.num_classes, key=jr.PRNGKey(0))
    with pytest.raises(ValueError, match=r"does not fit the model"):
        train(wider, task, pf.Discrete(), CONFIG, out, resume=True)
    assert _snapshot(out) == before


# ---------------------------------------------------------------------------------------
# The command line: resumption and errors
# ---------------------------------------------------------------------------------------


# The command line end to end (a training run through `pdeformer train`, then resumed or
# evaluated through the CLI): `-m integration`. The library's refusals (other data, another
# integrator, a model the checkpoint does not fit) are checked above, through `train`.
@pytest.mark.integration
@pytest.mark.parametrize(
    "change, listed",
    [
        (["--dim", "32"], "--dim: 16 -> 32"),
        (["--data-seed", "7"], "--data-seed: 0 -> 7"),
        (["--task-option", "op_prob=0.5"], "--task-option: "),
        (["--depth", "continuous"], "--depth: discrete -> continuous"),
        (["--lr", "0.01"], "--lr: 0.001 -> 0.01"),
    ],
)
def test_cli_resume_with_other_settings_is_refused(cli_run, capsys, change, listed):
    before = _snapshot(cli_run)
    argv = ["train", *TASK_ARGS, "--steps", "2", "--out", str(cli_run), "--resume", *change]
    assert cli.main(argv) == 2
    line = _error_line(capsys)
    assert line.startswith(f"cannot resume {cli_run}: ") and listed in line
    assert _snapshot(cli_run) == before


@pytest.mark.integration
def test_cli_resume_with_other_data_dir_is_refused(cli_run, capsys, tmp_path):
    argv = ["train", *TASK_ARGS, "--steps", "2", "--out", str(cli_run), "--resume"]
    assert cli.main([*argv, "--data-dir", str(tmp_path)]) == 2
    assert f"--data-dir: None -> {tmp_path}" in _error_line(capsys)


@pytest.mark.integration
def test_cli_failed_resume_leaves_run_json_untouched(cli_run, capsys, tmp_path):
    run = tmp_path / "copy"
    run.mkdir()
    for path in cli_run.iterdir():
        (run / path.name).write_bytes(path.read_bytes())
    # A resumable change (--eval-every) with a corrupt checkpoint: run.json, which the
    # command would rewrite with the new setting, must stay as it was.
    _flip_a_bit(run / json.loads((run / CHECKPOINT_NAME).read_text())["file"])
    before = _snapshot(run)
    argv = ["train", *TASK_ARGS, "--steps", "2", "--out", str(run), "--resume"]
    assert cli.main([*argv, "--eval-every", "1"]) == 1
    assert "is corrupt" in _error_line(capsys)
    assert _snapshot(run) == before


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "-1"], r"--lr must be > 0; got -1.0"),
        (["--dim", "10", "--heads", "3"], r"--heads must divide --dim=10"),
        (["--data-dir", "/no/such/dir"], r"--data-dir /no/such/dir: no such directory"),
        (
            ["--task-option", "max_length=4e1"],
            r"--task-option max_length=4e1: max_length wants an integer; got '4e1'",
        ),
        (["--bogus"], r"Unrecognized options: --bogus"),
        (["--solver", "rk4"], r"invalid choice 'rk4' for argument '--solver'"),
        (
            ["--depth", "continuous", "--step-size", "0.25", "--adjoint", "backsolve"],
            r"--adjoint backsolve needs the adaptive controller; got --step-size 0\.25, a "
            r"fixed-step solve, which is differentiated through its steps\. Pass --adjoint "
            r"recursive \(the default\) or direct, or drop --step-size\.$",
        ),
    ],
)
def test_cli_usage_errors_are_one_line_with_status_2(tmp_path, capsys, argv, message):
    assert cli.main(["train", "--out", str(tmp_path / "run"), *argv]) == 2
    assert re.match(message, _error_line(capsys))
    assert not (tmp_path / "run").exists()


def test_cli_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="--lr must be > 0"):
        cli.main(["train", "--out", str(tmp_path), "--lr", "-1", "--debug"])


@pytest.mark.integration
def test_cli_evaluate_errors(cli_run, capsys, tmp_path):
    assert cli.main(["evaluate", str(tmp_path)]) == 2
    assert "is not a run directory" in _error_line(capsys)
    argv = ["evaluate", str(cli_run), "--batch-size", "8", "--depth", "continuous"]
    assert cli.main([*argv, "--solver", "heun", "--rtol", "1e-9", "--max-steps", "2"]) == 1
    line = _error_line(capsys)
    assert "ran out of steps" in line and "raise --max-steps" in line and "--rtol" in line
