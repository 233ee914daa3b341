"""Interleaved timing for the benchmarks (stdlib only, so it imports before JAX)."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from typing import Any


def interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    label: str,
    log: Callable[[str], None],
    counters: dict[str, dict[str, list[float]]] | None = None,
) -> dict[str, list[float]]:
    """Call each of `fns` once per round for `repeats` rounds; the seconds of every call.

    Interleaving the variants spreads a busy spell of a shared machine over all of them,
    so their ratio survives it better than back-to-back blocks of repeats would.

    With `counters` (an empty dict), it is filled per name with the process's minor page
    faults (`minor_faults`) and system CPU seconds (`system_s`) of every call, from
    `getrusage`: the cost of memory the call touches for the first time, which the
    operating system zero-fills page by page.
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    if counters is not None:
        for name in fns:
            counters[name] = {"minor_faults": [], "system_s": []}
    for r in range(repeats):
        for name, fn in fns.items():
            before = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
            if counters is not None:
                after = resource.getrusage(resource.RUSAGE_SELF)
                counters[name]["minor_faults"].append(after.ru_minflt - before.ru_minflt)
                counters[name]["system_s"].append(after.ru_stime - before.ru_stime)
        log(
            f"{label} {r + 1}/{repeats}: "
            + ", ".join(f"{n} {1e3 * s[-1]:.1f} ms" for n, s in samples.items())
        )
    return samples


def counter_medians(counters: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Per name, the median minor page faults and system CPU milliseconds per call."""
    return {
        name: {
            "minor_faults_per_call": statistics.median(c["minor_faults"]),
            "system_cpu_ms_per_call": 1e3 * statistics.median(c["system_s"]),
        }
        for name, c in counters.items()
    }
