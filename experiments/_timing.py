"""Interleaved timing for the benchmarks (stdlib only, so it imports before JAX)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, label: str, log: Callable[[str], None]
) -> dict[str, list[float]]:
    """Call each of `fns` once per round for `repeats` rounds; the seconds of every call.

    Interleaving the variants spreads a busy spell of a shared machine over all of them,
    so their ratio survives it better than back-to-back blocks of repeats would.
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        log(
            f"{label} {r + 1}/{repeats}: "
            + ", ".join(f"{n} {1e3 * s[-1]:.1f} ms" for n, s in samples.items())
        )
    return samples
