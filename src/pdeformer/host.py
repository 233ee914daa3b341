"""Settings of the host process for XLA's CPU backend.

XLA's CPU runtime allocates a compiled program's working memory afresh on every call, from
its worker threads. glibc gives each such thread its own arena, and an arena other than the
main one serves a request larger than its heap (64 MiB on 64-bit Linux) with a fresh memory
map, whatever `mallopt` says about maps, and unmaps it when it is freed. The kernel then
zero-fills every 4 KiB page the next call touches. `tune_cpu_allocator` routes every
allocation to glibc's main arena, grown with `brk`, and keeps freed memory there for the
next call.
"""

import ctypes
import sys

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# The largest trim threshold mallopt takes (an int): freed memory up to 2 GiB at the top of
# the heap stays with the process.
_TRIM_THRESHOLD = 2**31 - 1

_tuned = False


def _glibc():
    """The process's C library where it is glibc (Linux), else `None`."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):
        return None
    return libc


def _backends_started() -> bool:
    try:
        from jax._src.xla_bridge import backends_are_initialized
    except ImportError:  # a JAX without this private function: assume not started
        return False
    return bool(backends_are_initialized())


def cpu_allocator_tuned() -> bool:
    """Whether `tune_cpu_allocator` has applied its settings in this process."""
    return _tuned


def tune_cpu_allocator() -> bool:
    """Keep XLA's CPU working memory in the process between calls (Linux with glibc).

    Sets glibc's `malloc` to one arena (`M_ARENA_MAX=1`), no memory maps for large blocks
    (`M_MMAP_MAX=0`) and a 2 GiB trim threshold (`M_TRIM_THRESHOLD`). After a few calls have
    grown the heap, a jitted call reuses the pages the previous call freed instead of having
    the kernel map and zero-fill them again. On a 2-core Intel Xeon, a `Discrete()` training
    step of batch 8, seq 512, dim 128, 4 layers went from about 49,000 page faults and 96 to
    116 ms of kernel time per call to none and under 3 ms; its wall time did not change
    beyond the machine's noise there (`experiments/bench_peers.py --tune-allocator`; figures
    in `docs/results/performance/results.md`). It saves kernel CPU time; whether that saves
    wall time depends on the machine.

    Call it once, at the start of a program, **before the first JAX computation**: the
    settings reach only the threads that have not yet allocated, and XLA's worker threads
    start with the CPU backend. Importing `jax` and `pdeformer` first is fine.

    The settings hold for the whole process, not only for JAX:

    - memory freed by the program stays mapped to it (up to 2 GiB at the top of the heap),
      so its resident size stays near its peak;
    - every thread allocates from one arena, which serialises `malloc` for programs that
      allocate small blocks heavily from many threads.

    The same settings can be given from outside, before Python starts:
    `GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647`.

    **Returns:**

    `True` when the settings are in force (also on a second call), `False` where the C
    library is not glibc (macOS, Windows, musl), where nothing is changed.

    **Raises:**

    `RuntimeError` when a JAX backend has already started in this process.
    """
    global _tuned
    if _tuned:
        return True
    if _backends_started():
        raise RuntimeError(
            "tune_cpu_allocator must be called before the first JAX computation (XLA's CPU "
            "threads keep the allocator arenas they started with); call it at the start of "
            "the program."
        )
    libc = _glibc()
    if libc is None:
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    _tuned = all(libc.mallopt(param, value) == 1 for param, value in settings)
    return _tuned
