"""`experiments/bench/diffusion.py` runs end to end on tiny sizes and reports sane figures."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_bench_diffusion_smoke(experiments, tmp_path):
    module = experiments("bench/diffusion")
    args = ["--preset", "smoke", "--out", str(tmp_path)]
    module.main(module._cli.parse(module.PRESETS, args, description=""))
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["diffusion_vs_attention_at_4096"] > 0
    assert result["meta"]["config"]["seq_compare"] == 64  # the length the ratio was taken at
    assert len(result["scaling_times_s"]) == len(result["scaling_seqs"]) == 2
    assert len(result["scaling_minor_faults_per_call"]) == 2
    # Twice the length, twice the working memory (a stencil, no seq x seq array).
    small, large = result["scaling_temp_mib"]
    assert 0 < small and large == pytest.approx(2 * small, rel=0.25)
    (row,) = result["stiff"]["by_D"]
    assert row["D"] == 12.5 and row["nfe_ratio"] == row["tsit5"]["nfe"] / row["exponential"]["nfe"]
    # Both solves (rtol 1e-4, atol = rtol / 10) close to the tight reference (rtol 1e-10).
    assert result["stiff"]["atol"] == pytest.approx(result["stiff"]["rtol"] / 10)
    for name in ("tsit5", "exponential"):
        assert row[name]["nfe"] > 0 and row[name]["max_abs_error"] < 1e-3
    assert result["nfe_explicit_vs_stiff_path_at_high_D"] == row["nfe_ratio"]
    assert set(result["targets"]) == {
        "diffusion_vs_attention_at_4096<=0.05",
        "scaling_exponent<=1.15",
        "nfe_explicit_vs_stiff_path_at_high_D>=5",
    }
    assert result["meta"]["machine"]["cpu"] and result["meta"]["date"].endswith("UTC")
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# The diffusion layer's cost") and "| 12.5 |" in md
