"""`pf.tune_cpu_allocator`: XLA's CPU working memory kept between calls (glibc only)."""

import os
import platform
import subprocess
import sys

import jax.numpy as jnp
import pytest

import pdeformer as pf
from helpers import CLASSIC_EMITTERS, FUSION_EMITTERS, xla_accepts
from pdeformer import host

# A jitted program with 128 MiB of working memory (two 64 MiB cumulative sums, which XLA
# cannot fuse away), above the 64 MiB heap of a glibc thread arena. It prints the fewest
# minor page faults of 7 calls after a warm-up that lasts until the heap has settled: the
# fewest, because without the setting every call maps its memory afresh, while with it a
# call on a settled heap faults no page. (With a fixed warm-up of 4 calls, CI's loaded
# machine once read a median of 51,336 faults with the setting: the heap was still growing.)
# With the setting, the first few calls still grow the heap until its free blocks fit a
# whole call, and a later call may grow it once more (per-call faults in one run here: 72k,
# 0, 0, 3, 0, 0, 35k, then 0).
_PROGRAM = """
import ctypes, resource, sys
import pdeformer as pf
tuned = pf.tune_cpu_allocator() if sys.argv[1] == "tune" else False
import jax, jax.numpy as jnp

@jax.jit
def f(x):
    return jnp.sum(jnp.cumsum(x, axis=0) * jnp.cumsum(x, axis=1))

x = jnp.ones((4096, 4096), jnp.float32)
# Warm up until the heap has settled: four calls in a row that leave the program break
# where it was. How many calls the heap needs to grow to hold every call's buffers depends
# on the order the runtime's threads allocate in, which load changes: with the setting,
# on a busy 2-core machine, up to 8 calls each grew it by 200 MiB (and faulted its pages).
libc = ctypes.CDLL(None)
libc.sbrk.restype = ctypes.c_void_p
libc.sbrk.argtypes = [ctypes.c_ssize_t]
calm = 0
for _ in range(40):
    top = libc.sbrk(0)
    f(x).block_until_ready()
    calm = calm + 1 if libc.sbrk(0) == top else 0
    if calm == 4:
        break
faults = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(tuned, pf.cpu_allocator_tuned(), min(faults))
"""


def _faults(mode: str) -> tuple[bool, bool, float]:
    # Compiled as a user's program is: the suite's compile settings (conftest.py) keep
    # more and differently sized buffers, which the heap does not settle on within 11 calls.
    # Allocator variables of the environment would change both arms: dropped.
    env = {
        k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")
    }
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0"
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if FUSION_EMITTERS not in f)
    run = subprocess.run(
        [sys.executable, "-c", _PROGRAM, mode], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr
    out = run.stdout.split()
    return out[0] == "True", out[1] == "True", float(out[2])


@pytest.mark.skipif(host._glibc() is None, reason="the C library is not glibc")
def test_tuned_allocator_stops_page_faults_of_large_working_memory():
    returned, reported, tuned = _faults("tune")
    assert returned and reported
    untuned_returned, untuned_reported, untuned = _faults("plain")
    assert not untuned_returned and not untuned_reported
    if untuned < 4096:  # 16 MiB of 4 KiB pages: the kernel gives huge pages here anyway
        pytest.skip(f"only {untuned:.0f} page faults per call without the setting")
    # Without it, every call maps its 128 MiB afresh (32768 pages of 4 KiB, at least), so
    # even its fewest faults stay high.
    assert tuned < untuned / 8, (tuned, untuned)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="not Linux with glibc",
)
def test_finds_glibc_on_glibc_linux():
    assert host._glibc() is not None


def test_refuses_after_jax_has_started(monkeypatch):
    monkeypatch.setattr(host, "_tuned", False)
    jnp.zeros(1).block_until_ready()
    with pytest.raises(RuntimeError, match="before JAX starts a backend"):
        pf.tune_cpu_allocator()
    assert not pf.cpu_allocator_tuned()


def test_second_call_returns_true(monkeypatch):
    monkeypatch.setattr(host, "_tuned", True)
    jnp.zeros(1).block_until_ready()
    assert pf.tune_cpu_allocator()


def test_no_glibc_changes_nothing(monkeypatch):
    monkeypatch.setattr(host, "_tuned", False)
    monkeypatch.setattr(host, "_backends_started", lambda: False)
    monkeypatch.setattr(host, "_glibc", lambda: None)
    assert pf.tune_cpu_allocator() is False
    assert not pf.cpu_allocator_tuned()


def test_xla_flag_probe_tells_known_from_unknown_flags():
    # conftest.py adds the classic-emitter flag only where this probe accepts it.
    assert xla_accepts(CLASSIC_EMITTERS)
    assert not xla_accepts("--xla_cpu_no_such_flag_of_pdeformer=true")
