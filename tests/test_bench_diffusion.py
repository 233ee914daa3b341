"""`experiments/bench_diffusion.py` runs end to end on tiny sizes and reports sane figures."""

import json

import pytest

pytestmark = pytest.mark.integration


# A benchmark script end to end: slow (see docs/architecture.md, *Test configuration*).
@pytest.mark.slow
def test_bench_diffusion_smoke(experiments, capsys):
    module = experiments("bench_diffusion")
    module._cli(["--smoke", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["diffusion_vs_attention_at_4096"] > 0
    assert result["config"]["seq_compare"] == 64  # the length the ratio was taken at
    assert len(result["scaling_times_s"]) == len(result["scaling_seqs"]) == 2
    assert len(result["scaling_minor_faults_per_call"]) == 2
    # Twice the length, twice the working memory (a stencil, no seq x seq array).
    small, large = result["scaling_temp_mib"]
    assert 0 < small and large == pytest.approx(2 * small, rel=0.25)
    (row,) = result["stiff"]["by_D"]
    assert row["D"] == 12.5 and row["nfe_ratio"] == row["tsit5"]["nfe"] / row["exponential"]["nfe"]
    # Both solves (rtol 1e-4, atol 1e-6) close to the tight reference (rtol 1e-10).
    for name in ("tsit5", "exponential"):
        assert row[name]["nfe"] > 0 and row[name]["max_abs_error"] < 1e-3
    assert result["nfe_explicit_vs_stiff_path_at_high_D"] == row["nfe_ratio"]
    assert set(result["targets"]) == {
        "diffusion_vs_attention_at_4096<=0.05",
        "scaling_exponent<=1.15",
        "nfe_explicit_vs_stiff_path_at_high_D>=5",
    }
    assert result["machine"]["cpu"] and result["date"].endswith("UTC")
    assert result["command"] == "python experiments/bench_diffusion.py --smoke --json"


@pytest.mark.slow
def test_bench_diffusion_tune_allocator():
    """`--tune-allocator` applies `pf.tune_cpu_allocator()` before JAX starts, in a process
    of its own (in this one a backend is already running), and records it."""
    import platform
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "bench_diffusion.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--smoke", "--json", "--tune-allocator"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert result["machine"]["cpu_allocator_tuned"] is glibc
    assert result["command"].endswith("--tune-allocator")
