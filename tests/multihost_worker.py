"""One process of the multi-process run of `test_multihost.py`, or its one-process reference.

    python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR

With `NUM_PROCESSES > 1` the process joins the others through
`jax.distributed.initialize` (coordinator on `localhost:PORT`, CPU collectives over gloo)
and trains with `DataParallel()` over every process's devices; with 1 it trains on one
device without `DataParallel`, the reference. Both train the same tiny ListOps classifier
(float64, so the two differ only by the order of floating-point sums) for three steps and
evaluate it under an adaptive continuous solve; the multi-process run stops after two steps
and resumes from its checkpoint in the shared `OUT_DIR`, and also assembles a batch from
process-local rows. With a fifth argument `cli` the process instead runs
`pdeformer train --distributed` (which joins the others itself). The last line of stdout is
one JSON object of what the test checks, on the line that starts with `MARK`.
Test configuration as in `parallel_worker.py`: strict dtype promotion, beartype on the
package's annotations, XLA's optimisations off (compiling dominates).
"""

import dataclasses
import json
import sys

import jax

process_id, num_processes, port, out_dir = sys.argv[1:5]
process_id, num_processes = int(process_id), int(num_processes)
# The result line's prefix: gloo writes lines of its own to stdout, at any time.
MARK = "multihost-result: "
# `cli`: the same run through `pdeformer train --distributed`, which initialises itself.
through_cli = sys.argv[5:] == ["cli"]

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_disable_most_optimizations", True)
if num_processes > 1 and not through_cli:
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=120,
    )

from jaxtyping import install_import_hook  # noqa: E402

with install_import_hook("pdeformer", "beartype.beartype"):
    import pdeformer as pf
    from pdeformer.cli import main as cli_main
    from pdeformer.data import ListOpsConfig, iterate_batches, load_task
    from pdeformer.training import DataParallel, TrainConfig, evaluate, to_host, train

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

if through_cli:  # before anything below touches a device
    args = ["train", "--task", "listops", "--out", out_dir, "--steps", "2", "--no-progress"]
    for option in ("max_depth=3", "min_length=5", "max_length=20", "num_train=24"):
        args += ["--task-option", option]
    args += ["--dim", "8", "--heads", "2", "--layers", "1", "--batch-size", "8"]
    args += ["--devices", "all", "--distributed", "--coordinator-address", f"localhost:{port}"]
    args += ["--num-processes", str(num_processes), "--process-id", str(process_id)]
    stdout, sys.stdout = sys.stdout, sys.stderr  # the CLI's own output is not the result
    rc = cli_main(args)
    sys.stdout = stdout
    print(MARK + json.dumps({"rc": rc, "process_count": jax.process_count()}), flush=True)
    sys.exit(0)

TINY = ListOpsConfig(max_depth=3, min_length=5, max_length=20, num_train=24, num_val=8, num_test=8)
CONFIG = TrainConfig(lr=3e-3, warmup_steps=0, total_steps=3, batch_size=8, progress=False)
DEPTH = pf.Discrete()
EVAL_DEPTH = pf.Continuous(diffrax.Tsit5(), diffrax.PIDController(rtol=1e-4, atol=1e-6))

task = load_task("listops", config=TINY, seed=0)
model = pf.Classifier(
    task.vocab_size, 8, 2, 1, task.num_classes, key=jr.PRNGKey(0), dtype=jnp.float64
)
result = {"process_index": jax.process_index(), "process_count": jax.process_count()}

if num_processes == 1:
    trained, history = train(model, task, DEPTH, CONFIG)
    ev = evaluate(trained, task.val, EVAL_DEPTH, 8)
else:
    parallel = DataParallel()
    result["devices"] = len(parallel.devices)
    result["local_devices"] = len(jax.local_devices())
    # Stopped after two steps (as a crash would stop it), then resumed from the checkpoint
    # of step 2 that process 0 wrote; every process waits until it is written.
    config = dataclasses.replace(CONFIG, checkpoint_every=1)
    early = []

    class Stop(Exception):
        pass

    def stop_after_two(step, record):
        early.append(record["loss"])
        if step == 1:
            raise Stop

    try:
        train(model, task, DEPTH, config, out_dir, parallel=parallel, callback=stop_after_two)
    except Stop:
        multihost_utils.sync_global_devices("checkpoint of step 2 written")
    trained, history = train(model, task, DEPTH, config, out_dir, resume=True, parallel=parallel)
    result["early_loss"] = early
    ev = evaluate(trained, task.val, EVAL_DEPTH, 8, parallel=parallel)
    # A batch assembled from process-local rows: process i passes rows [4i, 4i + 4).
    batch = next(iterate_batches(task.train, 8, pad_to=task.train.tokens.shape[1]))
    rows = slice(4 * process_id, 4 * process_id + 4)
    local = jax.tree.map(lambda a: a[rows], batch)
    assembled = parallel.shard(local, process_local=True)
    result["process_local_rows_equal"] = bool(
        np.array_equal(to_host(assembled.tokens), batch.tokens)
    )

result["loss"] = [r["loss"] for r in history]
leaves = jax.tree.leaves(eqx.filter(trained, eqx.is_inexact_array))
result["param_replicated"] = all(p.sharding.is_fully_replicated for p in leaves)
result["params"] = [np.ravel(to_host(p)).tolist() for p in leaves]
result["eval_logits"] = np.asarray(ev.logits).tolist()
result["eval_nfe"] = ev.mean_nfe
print(MARK + json.dumps(result), flush=True)
