"""The LRA per-task configurations (`experiments/studies/lra.py`), their price (parameters
from the built model, FLOPs by the stated formula, GPU time), and the placement study's
`--preset full`: official data or a labelled stand-in, and `--dry-run`."""

import dataclasses
import json

import jax.random as jr
import pytest


@pytest.fixture
def lra(experiments):
    return experiments("studies/lra")


def test_configurations_follow_the_lra_table(lra):
    listops = lra.TASKS["listops"]
    assert (listops.num_layers, listops.dim, listops.mlp_dim, listops.num_heads) == (
        4,
        512,
        1024,
        8,
    )
    assert (listops.dropout, listops.attention_dropout, listops.pooling) == (0.1, 0.1, "cls")
    assert (listops.batch_size, listops.lr, listops.schedule) == (32, 0.05, "rsqrt")
    assert (listops.warmup_steps, listops.total_steps, listops.max_length) == (1000, 5000, 2000)
    assert lra.TASKS["image"].positions == "learned" and lra.TASKS["pathfinder"].pooling == "mean"
    assert lra.TASKS["retrieval"].dual
    config = listops.train_config()
    assert (config.b1, config.b2, config.eps, config.weight_decay) == (0.9, 0.98, 1e-9, 0.1)
    # rsqrt keeps LRA's warm-up when the run is cut short; cosine shortens it to below the run.
    assert listops.train_config(steps=2).warmup_steps == 1000
    assert lra.TASKS["image"].train_config(steps=2).warmup_steps == 1


def test_parameters_come_from_the_model_and_flops_from_the_formula(lra):
    image = lra.TASKS["image"]
    abstract = lra.abstract_model(image)
    real = image.model(key=jr.PRNGKey(0))
    assert lra.parameter_count(abstract) == lra.parameter_count(real)
    assert real.head == "mlp" and isinstance(real.encoder.pooling, lra.pf.ClsPooling)
    assert real.encoder.positions.table.shape == (1024, 128)
    assert real.encoder.dropout == lra.pf.Dropout(0.3, 0.2)
    listops = lra.TASKS["listops"]
    counts = lra.flops_per_step(listops, lra.abstract_model(listops))
    d, mlp, s = 512, 1024, 2001
    per_token = 4 * (d * 3 * d + d * d + 2 * d * mlp)
    forward = 2 * per_token * s + 4 * 4 * s**2 * d + 2 * (d * mlp + mlp * 10)
    assert counts["matmul_params_per_token"] == per_token
    assert counts["step"] == 3 * forward * 32


def test_dry_run_prices_listops_within_ten_minutes_of_an_h100(lra):
    result = lra.dry_run(["listops", "retrieval"], ["baseline", "after_embedding (multi)"])
    json.dumps(result)  # JSON-ready
    run = result["runs"]["listops"]["baseline"]
    assert run["steps"] == 5000 and run["minutes"] <= 10
    assert run["gpu_hours"] == pytest.approx(run["total_flops"] / (0.3 * 989e12) / 3600, rel=1e-12)
    multi = result["runs"]["listops"]["after_embedding (multi)"]
    assert (
        multi["parameters"] > run["parameters"] and multi["flops_per_step"] > run["flops_per_step"]
    )
    assert not result["runs"]["retrieval"]["baseline"]["attention_fits"]
    half = lra.dry_run(["listops"], mfu=0.15)["runs"]["listops"]["baseline"]
    assert half["minutes"] == pytest.approx(2 * run["minutes"])
    with pytest.raises(ValueError, match="no LRA configuration for \\['pathx'\\]"):
        lra.dry_run(["pathx"])
    with pytest.raises(ValueError, match="unknown arm 'nowhere'"):
        lra.parse_arm("nowhere")


def test_full_preset_dry_run_prints_json_and_trains_nothing(experiments, capsys, tmp_path):
    module = experiments("studies/lra_placement")
    argv = ["--preset", "full", "--tasks", "listops", "--seeds", "0", "--baseline-only"]
    config = module._cli.parse(
        module.PRESETS, [*argv, "--dry-run", "--out", str(tmp_path)], description=""
    )
    assert config.lra_configs and config.data_dir is None
    estimate = module.main(config)
    printed = json.loads(capsys.readouterr().out)
    assert printed["data"] == "stand-in" and list(printed["runs"]["listops"]) == ["baseline"]
    assert estimate["runs"]["listops"]["baseline"]["minutes"] <= 10
    assert not (tmp_path / "results.json").exists()
    # Without --data-dir the full preset refuses to train, unless asked for the stand-in.
    with pytest.raises(ValueError, match="pass --data-dir DIR .* or --allow-stand-in"):
        module.main(
            module._cli.parse(module.PRESETS, [*argv, "--out", str(tmp_path)], description="")
        )
    # The LRA configurations build the plain diffusion layer only: a token-adaptive arm is
    # refused before anything trains.
    full = module._cli.parse(module.PRESETS, [*argv, "--dry-run"], description="")
    adaptive = module.Arm("after_embedding", "adaptive", (1,), module.pf.AdaptiveDiffusionLayer)
    with pytest.raises(ValueError, match=r"build pf.DiffusionLayer arms only; drop \['"):
        module.main(dataclasses.replace(full, arms=(adaptive,), baseline_only=False))


@pytest.mark.integration  # the LRA ListOps model (9M parameters) trained 2 steps on a CPU
def test_full_listops_configuration_trains_on_a_cpu(experiments, tmp_path):
    module = experiments("studies/lra_placement")
    config = module.dataclasses.replace(
        module.Config.full(),
        tasks=("listops",),
        options=module._offline_options("smoke"),
        seeds=(0,),
        baseline_only=True,
        steps=2,
        allow_stand_in=True,
        max_length=20,
        eval_batch_size=16,
        out=tmp_path,
    )
    results = module.main(config)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["lra"]["stand_in"] and saved["tasks"]["listops"]["stand_in"]
    assert saved["lra"]["configs"]["listops"]["dim"] == 512
    md = (tmp_path / "results.md").read_text()
    assert "STAND-IN DATA" in md.splitlines()[0]
    assert "listops: 4 layers, width 512, 8 heads, FFN 1024" in md
    accuracy = results["tasks"]["listops"]["arms"]["baseline"]["accuracy"][0]
    assert 0.0 <= accuracy <= 1.0
