"""Runs the data-parallel measurements of `test_parallel.py` in a process of its own.

JAX fixes its device count when it starts, and the pytest process has started with one
device; this script is run with `--xla_force_host_platform_device_count=4` added to the
tests' `XLA_FLAGS`, and `JAX_PLATFORMS=cpu`, and prints one JSON object of measurements,
which the tests check. It keeps the test configuration: strict dtype promotion, warnings as
errors, and beartype on the package's jaxtyping annotations. Float64, so one device and four
agree to rounding; XLA's optimisations off, as for the docs examples, since compiling
dominates.
"""

import dataclasses
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.simplefilter("error")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
# Compiling dominates these tiny runs on a CPU (as in the docs examples).
jax.config.update("jax_disable_most_optimizations", True)

from jaxtyping import install_import_hook  # noqa: E402

with install_import_hook("pdeformer", "beartype.beartype"):
    import pdeformer as pf
    from pdeformer.cli import main as cli_main
    from pdeformer.data import ListOpsConfig, iterate_batches, load_task
    from pdeformer.training import DataParallel, TrainConfig, evaluate, train, train_step

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402

TINY = ListOpsConfig(max_depth=3, min_length=5, max_length=20, num_train=24, num_val=8, num_test=8)


def model(task, seed=0):
    return pf.Classifier(
        task.vocab_size, 8, 2, 1, task.num_classes, key=jr.PRNGKey(seed), dtype=jnp.float64
    )


def params(m):
    return jax.tree.leaves(eqx.filter(m, eqx.is_inexact_array))


def max_diff(a, b):
    pairs = zip(a, b, strict=True)
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)


# One optimiser for every run, so each (depth, device count) compiles the step once.
CONFIG = TrainConfig(lr=3e-3, warmup_steps=0, total_steps=3, batch_size=8, progress=False)


def compare(task, depth, steps, *, evaluation=True):
    config = dataclasses.replace(CONFIG, total_steps=steps)
    one, h1 = train(model(task), task, depth, config)
    four, h4 = train(model(task), task, depth, config, parallel=DataParallel())
    leaves = params(four)
    result = {
        "loss_1": [r["loss"] for r in h1],
        "loss_4": [r["loss"] for r in h4],
        "grad_norm_1": [r["grad_norm"] for r in h1],
        "grad_norm_4": [r["grad_norm"] for r in h4],
        "nfe_1": [r["nfe"] for r in h1],
        "nfe_4": [r["nfe"] for r in h4],
        "param_diff": max_diff(params(one), leaves),
        "param_devices": sorted({len(p.sharding.device_set) for p in leaves}),
        "param_replicated": all(p.sharding.is_fully_replicated for p in leaves),
    }
    if evaluation:
        ev1 = evaluate(one, task.val, depth, 8)
        ev4 = evaluate(four, task.val, depth, 8, parallel=DataParallel())
        result["eval_logit_diff"] = float(np.max(np.abs(ev1.logits - ev4.logits)))
        result["eval_nfe"] = [ev1.mean_nfe, ev4.mean_nfe]
    return result


def sharding_of_a_batch(task):
    parallel = DataParallel()
    batch = next(iterate_batches(task.train, 8, pad_to=task.train.tokens.shape[1]))
    sharded = parallel.shard(batch)
    tokens = sharded.tokens
    return {
        "tokens_shape": list(tokens.shape),
        "shard_shapes": [list(s.data.shape) for s in tokens.addressable_shards],
        "shard_devices": len({s.device for s in tokens.addressable_shards}),
        "shard_rows": [s.index[0].start for s in tokens.addressable_shards],
        "values_kept": bool(np.array_equal(np.asarray(tokens), batch.tokens)),
        "labels_sharded": not sharded.labels.sharding.is_fully_replicated,
        "tokens2_none": sharded.tokens2 is None,
        "mesh_axes": list(parallel.mesh.axis_names),
    }


def step_outputs_stay_replicated(task):
    # A user's own loop: replicate, shard, call the one train_step.
    parallel = DataParallel()
    optimizer = pf.training.make_optimizer(CONFIG)
    m = model(task)
    state = optimizer.init(eqx.filter(m, eqx.is_inexact_array))
    m, state = parallel.replicate((m, state))
    batch = parallel.shard(next(iterate_batches(task.train, 8, pad_to=task.train.tokens.shape[1])))
    m, state, metrics = train_step(m, state, batch, pf.Discrete(), optimizer)
    arrays = jax.tree.leaves(eqx.filter((m, state, metrics), eqx.is_array))
    return {
        "all_replicated_on_4": all(a.sharding.is_fully_replicated for a in arrays)
        and all(len(a.sharding.device_set) == 4 for a in arrays)
    }


def sharded_attention():
    # The CPU attention on a batch split over the four devices: each device computes its own
    # sequences' pairs; no collective gathers the activations onto every device.
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    from pdeformer.operators.attention import attention

    mesh = jax.make_mesh((4,), ("batch",), axis_types=(AxisType.Auto,))
    shape = (8, 32, 2, 4)  # 16 (sequence, head) pairs
    q, k, v = (jr.normal(jr.PRNGKey(i), shape, jnp.float64) for i in range(3))
    mask = jnp.arange(32)[None, :] < jnp.arange(25, 33)[:, None]

    def grads(q, k, v, mask):
        loss = lambda q, k, v: jnp.sum(
            jnp.sin(attention(q, k, v, mask, implementation="blockwise"))
        )
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    fn = jax.jit(grads)
    one = fn(q, k, v, mask)
    sharded = [
        jax.device_put(x, NamedSharding(mesh, PartitionSpec("batch"))) for x in (q, k, v, mask)
    ]
    hlo = fn.lower(*sharded).compile().as_text()
    four = fn(*sharded)
    return {
        "gathers": sum(hlo.count(op) for op in ("all-gather", "all-to-all", "collective-permute")),
        "grad_diff": max_diff(one, four),
        "grads_sharded": all(
            len(g.sharding.device_set) == 4 and not g.sharding.is_fully_replicated for g in four
        ),
    }


def errors(task):
    out = {}
    config = TrainConfig(warmup_steps=0, total_steps=1, batch_size=6, progress=False)
    try:
        train(model(task), task, pf.Discrete(), config, parallel=DataParallel())
    except ValueError as e:
        out["train_batch"] = str(e)
    try:
        evaluate(model(task), task.val, pf.Discrete(), 6, parallel=DataParallel(devices=4))
    except ValueError as e:
        out["eval_batch"] = str(e)
    try:
        DataParallel(devices=5)
    except ValueError as e:
        out["too_many"] = str(e)
    return out


def resume(task):
    config = dataclasses.replace(CONFIG, checkpoint_every=2)
    with tempfile.TemporaryDirectory() as tmp:
        full, h_full = train(
            model(task), task, pf.Discrete(), config, Path(tmp) / "a", parallel=DataParallel()
        )

        def stop(step, record):
            if step == 1:
                raise KeyboardInterrupt  # before the checkpoint of step 2

        out = Path(tmp) / "b"
        try:
            train(
                model(task),
                task,
                pf.Discrete(),
                config,
                out,
                callback=stop,
                parallel=DataParallel(),
            )
        except KeyboardInterrupt:
            pass
        resumed, h_res = train(
            model(task, seed=9),
            task,
            pf.Discrete(),
            config,
            out,
            resume=True,
            parallel=DataParallel(),
        )
        # A checkpoint written on four devices is read on one.
        single, h_single = train(model(task, seed=9), task, pf.Discrete(), config, out, resume=True)
    strip = lambda h: [{k: v for k, v in r.items() if k != "time"} for r in h]  # noqa: E731
    return {
        "resumed_param_diff": max_diff(params(full), params(resumed)),
        "history_equal": strip(h_full) == strip(h_res),
        "single_device_read_diff": max_diff(params(full), params(single)),
        "single_device_sharding": len(params(single)[0].sharding.device_set),
    }


def cli(task):
    args = ["--task-option", "max_depth=3", "--task-option", "min_length=5"]
    args += ["--task-option", "max_length=20", "--task-option", "num_train=24"]
    args += ["--task-option", "num_val=8", "--task-option", "num_test=8"]
    args += ["--dim", "8", "--heads", "2", "--layers", "1", "--batch-size", "8"]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        argv = ["train", *args, "--steps", "1", "--out", str(run), "--no-progress"]
        rc_train = cli_main([*argv, "--devices", "all"])
        rc_eval = cli_main(["evaluate", str(run), "--batch-size", "8", "--devices", "2"])
        recorded = json.loads((run / "checkpoint.json").read_text())["devices"]
    return {"rc": [rc_train, rc_eval], "recorded_devices": recorded}


def main() -> None:
    task = load_task("listops", config=TINY, seed=0)
    # Heun and throw=False keep the compiled backward pass small.
    adaptive = pf.Continuous(
        diffrax.Heun(), diffrax.PIDController(rtol=1e-3, atol=1e-4), max_steps=32, throw=False
    )
    stdout = sys.stdout
    sys.stdout = sys.stderr  # the CLI's own JSON lines are not the result
    result = {"device_count": jax.device_count(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    seconds = {}
    checks = {
        "batch": lambda: sharding_of_a_batch(task),
        "discrete": lambda: compare(task, pf.Discrete(), steps=3),
        "replicated_step": lambda: step_outputs_stay_replicated(task),
        "resume": lambda: resume(task),
        "adaptive": lambda: compare(task, adaptive, steps=2, evaluation=False),
        "errors": lambda: errors(task),
        "sharded_attention": sharded_attention,
        "cli": lambda: cli(task),
    }
    for name, check in checks.items():
        t0 = time.perf_counter()
        result[name] = check()
        seconds[name] = round(time.perf_counter() - t0, 2)
    result["seconds"] = seconds
    sys.stdout = stdout
    print(json.dumps(result))


if __name__ == "__main__":
    main()
