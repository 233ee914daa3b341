"""Data parallelism: four virtual CPU devices against one, in a subprocess (parallel_worker.py).

The pytest process has already started JAX with one device, so the four-device runs happen in
a child process whose `XLA_FLAGS` add `--xla_force_host_platform_device_count=4` to the
tests' own (`helpers.cpu_devices_env`); it prints its measurements as JSON and the tests
below check them. The runs are float64, so sharding changes results only by the order of
floating-point sums.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers import cpu_devices_env
from pdeformer.cli import data_parallel
from pdeformer.cli import main as cli_main
from pdeformer.data import Batch
from pdeformer.training import DataParallel, to_host

pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("parallel_worker.py")


@pytest.fixture(scope="module")
def measured():
    env = cpu_devices_env(4)
    proc = subprocess.run(
        [sys.executable, str(WORKER)], capture_output=True, text=True, env=env, timeout=600
    )
    if proc.returncode != 0:
        pytest.fail(f"{WORKER.name} failed:\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_batches_are_split_over_four_devices(measured):
    assert measured["device_count"] == 4
    # The child keeps the tests' own compile settings (conftest.py) beside the device count.
    assert set(os.environ.get("XLA_FLAGS", "").split()) <= set(measured["xla_flags"].split())
    assert "--xla_force_host_platform_device_count=4" in measured["xla_flags"].split()
    batch = measured["batch"]
    assert batch["mesh_axes"] == ["batch"]
    rows, length = batch["tokens_shape"]
    assert rows == 8
    assert batch["shard_shapes"] == [[2, length]] * 4
    assert batch["shard_devices"] == 4
    assert sorted(batch["shard_rows"]) == [0, 2, 4, 6]
    assert batch["values_kept"] and batch["labels_sharded"] and batch["tokens2_none"]


@pytest.mark.parametrize("depth", ["discrete", "adaptive"])
def test_training_on_four_devices_matches_one(measured, depth):
    run = measured[depth]
    np.testing.assert_allclose(run["loss_4"], run["loss_1"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(run["grad_norm_4"], run["grad_norm_1"], rtol=1e-12, atol=0)
    # Adam divides by sqrt(v): a gradient near zero turns rounding into a small update.
    assert run["param_diff"] < 1e-10
    # The batch is one ODE on four devices too: the same steps, so the same NFE.
    assert run["nfe_4"] == run["nfe_1"]
    assert run["param_devices"] == [4] and run["param_replicated"]


def test_adaptive_solve_is_adaptive(measured):
    # Otherwise the NFE comparison above would not say anything about the error norm.
    nfe = measured["adaptive"]["nfe_1"]
    assert all(n > 2 for n in nfe) and len(nfe) == 2


def test_evaluation_on_four_devices_matches_one(measured):
    run = measured["discrete"]
    assert run["eval_logit_diff"] < 1e-12
    assert run["eval_nfe"][0] == run["eval_nfe"][1] == 2.0


def test_a_sharded_step_keeps_parameters_replicated(measured):
    assert measured["replicated_step"]["all_replicated_on_4"]


def test_resume_on_four_devices_is_exact_and_loads_on_one(measured):
    resume = measured["resume"]
    assert resume["resumed_param_diff"] == 0.0
    assert resume["history_equal"]
    assert resume["single_device_read_diff"] == 0.0
    assert resume["single_device_sharding"] == 1


def test_sharded_blockwise_attention_stays_on_its_devices(measured):
    # Its loops walk groups of (sequence, head) pairs; a group must span the devices, or XLA
    # gathers every pair onto every device and each one computes the whole batch.
    run = measured["sharded_attention"]
    assert run["gathers"] == 0
    assert run["grads_sharded"]
    assert run["grad_diff"] < 1e-12


def test_batch_size_not_divisible_says_what_to_pass(measured):
    errors = measured["errors"]
    assert errors["train_batch"] == (
        "TrainConfig.batch_size must be divisible by the number of devices of DataParallel "
        "(4); got TrainConfig.batch_size=6. Pass a multiple of 4 (e.g. 4 or 8), or "
        "DataParallel(devices=k) with k dividing 6 (one of [1, 2, 3])."
    )
    assert errors["eval_batch"].startswith("batch_size must be divisible by the number of")
    assert re.match(r"devices must lie in \[1, 4\] .*got devices=5", errors["too_many"])


def test_cli_devices_option(measured):
    assert measured["cli"] == {"rc": [0, 0], "recorded_devices": 4}


# One device, in this process: validation and the command line's names.


def test_data_parallel_validation_says_the_fix():
    n = jax.device_count()
    with pytest.raises(ValueError, match=rf"devices must lie in \[1, {n}\] .*got devices=0"):
        DataParallel(devices=0)
    with pytest.raises(ValueError, match="devices must not be empty"):
        DataParallel(devices=[])
    with pytest.raises(ValueError, match="devices must be distinct"):
        DataParallel(devices=[jax.devices()[0]] * 2)
    assert DataParallel().num_devices == n
    assert DataParallel(devices=1).devices == (jax.devices()[0],)


def test_cli_maps_device_names():
    assert data_parallel(None) is None
    assert data_parallel("all").num_devices == jax.device_count()
    assert data_parallel("1").num_devices == 1
    with pytest.raises(ValueError, match=r"--devices expects a device count or 'all'; got 'x'"):
        data_parallel("x")


def test_cli_help_lists_device_options(capsys):
    for command in ("train", "evaluate"):
        with pytest.raises(SystemExit):
            cli_main([command, "--help"])
        text = capsys.readouterr().out
        assert "--devices" in text and "--distributed" in text


def test_shard_and_to_host_on_one_device():
    parallel = DataParallel(devices=1)
    tokens = np.arange(6, dtype=np.int32).reshape(3, 2)
    batch = Batch(tokens, tokens > 0, np.array([0, 1, 2], np.int32))
    sharded = parallel.shard(batch)
    assert sharded.tokens.sharding == parallel.batch_sharding
    assert sharded.tokens2 is None and sharded.mask2 is None
    host = to_host({"t": sharded.tokens, "n": 3})
    assert isinstance(host["t"], np.ndarray) and host["n"] == 3
    np.testing.assert_array_equal(host["t"], tokens)
    replicated = parallel.replicate({"w": tokens, "name": "w"})
    assert replicated["w"].sharding == parallel.replicated and replicated["name"] == "w"
