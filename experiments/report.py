"""The one report module of the studies and benchmarks: the record, the page, the files.

Every script of `experiments/studies/` and `experiments/bench/` ends the same way:

    record = report.meta(config)                   # command, date, machine, config
    ...                                            # the measurements
    record["wall_s"] = ...
    report.write(config.out, {"meta": record, ...}, title, body, verdict=None)

which writes `results.json` (strict JSON: non-finite numbers become `null`) and
`results.md` (the header: title, command, date, machine; then a verdict where one is
given; then `body`, the script's own tables) into `config.out`, and prints the page.
Plots go beside them through `pyplot()` and `save_figure()`.

A `Verdict` is a gate a run must pass before its numbers mean anything (for example: the
model learned more than the best trivial rule). It is shown at the top of the page, in bold
when the run failed it, and recorded under `"verdict"` in `results.json`.

The scripts import this module as `report`: each puts `experiments/` on `sys.path` first.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DATE_FORMAT = "%Y-%m-%d %H:%M UTC"
EXPERIMENTS = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The outcome of a gate that a run must pass before its results are read.

    **Arguments:**

    - `name`: what was checked, e.g. `"learning gate"`.
    - `passed`: whether the run passed it.
    - `reason`: one sentence with the numbers that decided it.
    """

    name: str
    passed: bool
    reason: str

    def lines(self) -> list[str]:
        """The Markdown shown at the top of a results page."""
        if self.passed:
            return [f"> {self.name}: passed. {self.reason}"]
        return [
            f"> **{self.name}: FAILED.** {self.reason}",
            ">",
            "> The tables below are recorded as measured; they support no conclusion.",
        ]


def logger(name: str) -> Callable[[str], None]:
    """A function printing timestamped progress lines to stderr."""

    def log(message: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    return log


# ---------------------------------------------------------------------------------------
# Where and how a result was obtained
# ---------------------------------------------------------------------------------------


def command() -> str:
    """The command line that started this process, as it would be typed from the
    repository root (`python experiments/... --preset ...`)."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is None or EXPERIMENTS not in script.parents:
        return "main(config) called from Python"
    rel = script.relative_to(EXPERIMENTS.parent)
    return shlex.join(["python", str(rel), *sys.argv[1:]])


def _lscpu() -> dict[str, str]:
    """`lscpu`'s "Field: value" lines as a dict (empty where `lscpu` is missing or fails)."""
    if not shutil.which("lscpu"):
        return {}
    try:
        text = subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=False, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def _cpu_model(lscpu: dict[str, str]) -> str:
    if "Model name" in lscpu:
        return lscpu["Model name"]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """CPU model and L3 cache (from `lscpu`), CPU count, platform, Python and jax versions,
    devices (and the first one's kind and backend), load average, and the allocator's
    environment variables (`GLIBC_TUNABLES`, `MALLOC_*`) where set. Call it after choosing
    JAX's platform: it starts JAX's backend."""
    import jax

    lscpu = _lscpu()
    devices = jax.devices()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": _cpu_model(lscpu),
        "cpu_count": os.cpu_count(),
        "l3_cache": lscpu.get("L3 cache"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "devices": [str(d) for d in devices],
        "device_kind": devices[0].device_kind,
        "backend": devices[0].platform,
        "load_average": load,
        # Allocator settings change CPU timings (XLA allocates its working memory on every
        # call; docs/howto/devices.md, "On a CPU"): recorded where set.
        "malloc_env": {
            k: v for k, v in os.environ.items() if k == "GLIBC_TUNABLES" or k.startswith("MALLOC_")
        },
    }


def integrator_label(depth: Any) -> str:
    """A short name of a depth integrator, e.g. `Tsit5, PID rtol=0.01 atol=0.001`,
    `Euler, constant h=0.5` or `Discrete`."""
    import diffrax
    import numpy as np

    import pdeformer as pf

    if isinstance(depth, pf.Continuous):
        name = type(depth.solver).__name__
        controller = depth.controller
        if isinstance(controller, diffrax.PIDController):
            rtol = float(np.asarray(controller.rtol))
            atol = float(np.asarray(controller.atol))
            return f"{name}, PID rtol={rtol:g} atol={atol:g}"
        return f"{name}, constant h={depth.dt0:g}"
    return type(depth).__name__


def describe(value: Any) -> Any:
    """A JSON-friendly description of a config value (dataclasses, solvers, integrators,
    paths, types): what `results.json` records as `meta.config`."""
    if isinstance(value, type):
        return value.__name__
    if isinstance(value, Path):
        return str(value)
    module = type(value).__module__.split(".")[0]
    if module == "diffrax":  # solvers and controllers: by name
        return type(value).__name__
    if module == "pdeformer":
        import pdeformer as pf

        if isinstance(value, pf.AbstractDepth):
            return integrator_label(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: describe(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [describe(x) for x in value]
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if callable(value) and hasattr(value, "__name__"):
        return value.__name__
    return type(value).__name__


def meta(config: Any) -> dict[str, Any]:
    """The `meta` entry of `results.json`: command, date, machine, config; `wall_s` to be
    filled in by the script when it is done."""
    return {
        "command": command(),
        "date": datetime.datetime.now(datetime.UTC).strftime(DATE_FORMAT),
        "machine": machine(),
        "config": describe(config),
        "wall_s": None,
    }


def header(title: str, meta: dict[str, Any]) -> list[str]:
    """The first lines of a `results.md`: title, command, date, machine and jax version,
    and the run's wall time where known."""
    m = meta["machine"]
    load = m.get("load_average")
    load_text = "" if load is None else f"; load average at start {load[0]:.2f} (1 min)"
    lines = [
        f"# {title}",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        f"- machine: {m['cpu']} ({m['cpu_count']} CPUs), devices {', '.join(m['devices'])}, "
        f"jax {m['jax']}, Python {m['python']}{load_text}",
    ]
    if meta.get("wall_s") is not None:
        lines.append(f"- wall time of the whole run: {meta['wall_s']:.0f} s")
    return lines


# ---------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------


def json_safe(value: Any) -> Any:
    """Replace non-finite floats by `None` (strict JSON has no NaN or infinity), recursively;
    numpy scalars and arrays become Python numbers and lists."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy arrays and scalars
        return json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def page(title: str, meta: dict[str, Any], body: str, verdict: Verdict | None = None) -> str:
    """A results page: the header, the verdict where there is one, then `body`."""
    lines = header(title, meta)
    if verdict is not None:
        lines += ["", *verdict.lines()]
    return "\n".join([*lines, "", body.strip(), ""])


def write(
    out: Path | None,
    results: dict[str, Any],
    title: str,
    body: str,
    *,
    verdict: Verdict | None = None,
    log: Callable[[str], None] | None = None,
) -> str:
    """Write `results.md` and `results.json` into `out` and print the page to stdout.

    **Arguments:**

    - `out`: the output directory (created); `None` writes nothing and only prints.
    - `results`: everything measured, with `"meta"` from `meta()`; the verdict is added
      under `"verdict"`.
    - `title`, `body`: the page's title and its Markdown after the header.
    - `verdict`: a gate's outcome, shown at the top of the page.
    - `log`: where to say what was written.

    **Returns:**

    The page's Markdown.
    """
    if verdict is not None:
        results = {**results, "verdict": dataclasses.asdict(verdict)}
    markdown = page(title, results["meta"], body, verdict)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(markdown)
        text = json.dumps(json_safe(results), indent=2, allow_nan=False)
        (out / "results.json").write_text(text + "\n")
        if log is not None:
            log(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    print(markdown)
    return markdown


def run_mode(
    config: Any,
    modes: dict[str, Callable[[Any], dict[str, Any]]],
    tables: dict[str, Callable[[dict[str, Any], dict[str, Any]], str]],
    titles: dict[str, str],
    *,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the mode `config.mode` of a benchmark with modes and write its page.

    **Arguments:**

    - `config`: a frozen config with `mode`, `out`, and one settings field per mode, named
      after it.
    - `modes`, `tables`, `titles`: per mode, the function of its settings returning its
      figures, the function of `(result, settings as a dict)` returning its Markdown
      tables, and its page's title.
    - `log`: where to say what was written.

    **Returns:**

    `{"mode": ..., **figures, "meta": ...}`, as written to `results.json`.
    """
    record = meta(config)
    start = time.perf_counter()
    settings = getattr(config, config.mode)
    result = {"mode": config.mode, **modes[config.mode](settings), "meta": record}
    record["wall_s"] = time.perf_counter() - start
    body = tables[config.mode](result, dataclasses.asdict(settings))
    write(config.out, result, titles[config.mode], body, log=log)
    return result


def pyplot(log: Callable[[str], None]):
    """`matplotlib.pyplot` with the file-only Agg backend, or `None` if not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("warning: matplotlib is not installed; skipping the plots")
        return None
    return plt


def save_figure(fig, path: Path, log: Callable[[str], None]) -> None:
    """Save a figure at a fixed resolution, close it, and say so."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    log(f"wrote {path}")


VERDICTS = ("holds", "does not hold", "not resolved")
"""The verdicts of a claim in the replication table (`docs/hooks/replication.py`)."""


def claim_verdict(
    low: float,
    high: float,
    threshold: float,
    direction: str,
    p: float | None = None,
    alpha: float = 0.05,
) -> str:
    """The verdict on a claim that a quantity lies `direction` (`"above"` or `"below"`)
    `threshold`, from the measured 95% interval `[low, high]`.

    `holds`: the whole interval lies on the claimed side of the threshold; `does not hold`:
    the whole interval lies on the other side; `not resolved`: the interval contains the
    threshold. Where a (multiplicity-corrected) p-value `p` is given, a verdict other than
    `not resolved` also needs `p <= alpha`.
    """
    if direction not in ("above", "below"):
        raise ValueError(f"direction must be 'above' or 'below'; got {direction!r}.")
    if low > high:
        raise ValueError(f"need low <= high; got [{low}, {high}].")
    significant = p is None or p <= alpha
    above, below = low > threshold, high < threshold
    if significant and (above if direction == "above" else below):
        return "holds"
    if significant and (below if direction == "above" else above):
        return "does not hold"
    return "not resolved"


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for a Markdown table (`-` for a missing or non-finite one)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}"
