"""Per-instruction self times of a compiled XLA program, from `jax.profiler.trace`.

Used by both modes of `profiling.py`. The trace's events are attributed
to the compiled program's HLO instructions by name; an instruction's *self* time is its
duration less that of the events nested inside it.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import jax

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\(", re.M)
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$", re.M)
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def instructions(hlo: str) -> dict[str, dict[str, Any]]:
    """Each HLO instruction's shape, opcode, JAX op name, whether it is a matmul, and the
    opcodes it runs (those of the computation a fusion calls, or its own)."""
    opcodes, name = collections.defaultdict(set), None
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            name = m.group(1)
            continue
        m = _INSTRUCTION.match(line)
        if name is not None and m:
            opcodes[name].add(m.group(3))
    out = {}
    for line in hlo.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        inst, shape, opcode = m.groups()
        calls = _CALLS.search(line)
        op = _OP_NAME.search(line)
        ops = opcodes[calls.group(1)] if opcode == "fusion" and calls else {opcode}
        out[inst] = {
            "shape": shape,
            "opcode": opcode,
            "op_name": op.group(1) if op else "",
            "matmul": bool(ops & {"dot", "convolution"}),
            "ops": sorted(ops),
        }
    return out


def self_times(trace: dict[str, Any]) -> tuple[dict[str, float], dict[str, int]]:
    """Summed self time (microseconds) and count of each event name in a Chrome trace."""
    threads = collections.defaultdict(list)
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and "dur" in e:
            threads[(e["pid"], e["tid"])].append(e)
    self_us, count = collections.Counter(), collections.Counter()
    for events in threads.values():
        events.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []
        for e in events:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            if stack:
                self_us[stack[-1]["name"]] -= e["dur"]
            self_us[e["name"]] += e["dur"]
            count[e["name"]] += 1
            stack.append(e)
    return self_us, count


def profile(compiled: Any, args: tuple, calls: int) -> dict[str, Any]:
    """Run `compiled(*args)` `calls` times under the profiler (after one warm-up call).

    **Returns:**

    `instructions` (as `instructions()`, each with `ms`, its self time per call, and
    `calls`, its events per call; only those that ran), `runtime_ms` (self time per call of
    the runtime's own events, by name; its "wait" events span work done on other threads),
    `wall_ms_per_call` (under the profiler) and `output` (the warm-up call's result).
    """
    info = instructions(compiled.as_text())
    output = jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with jax.profiler.trace(tmp):
            for _ in range(calls):
                jax.block_until_ready(compiled(*args))
        wall_ms = 1e3 * (time.perf_counter() - start) / calls
        traces = sorted(Path(tmp).rglob("*.trace.json.gz"))
        if not traces:
            raise RuntimeError("jax.profiler.trace wrote no trace file.")
        with gzip.open(traces[0]) as f:
            self_us, count = self_times(json.load(f))
    ran, runtime = {}, collections.Counter()
    for name, us in self_us.items():
        ms = us / 1e3 / calls
        if name in info:
            ran[name] = {**info[name], "ms": ms, "calls": count[name] // calls}
        elif not name.startswith("$"):  # `$...` events are Python frames: the host
            runtime[name] += ms
    return {
        "instructions": ran,
        "runtime_ms": dict(runtime),
        "wall_ms_per_call": wall_ms,
        "output": output,
    }
