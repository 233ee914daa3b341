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
import warnings

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# The largest trim threshold mallopt takes (an int): freed memory up to 2 GiB at the top of
# the heap stays with the process.
_TRIM_THRESHOLD = 2**31 - 1

_tuned = False


def _address(function) -> int | None:
    return ctypes.cast(function, ctypes.c_void_p).value


def _glibc():
    """The process's C library where it is glibc (Linux) and its `malloc` is the one in use,
    else `None` (another C library, or an allocator such as jemalloc preloaded over it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        process, libc = ctypes.CDLL(None), ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not all(hasattr(process, n) for n in ("gnu_get_libc_version", "mallopt", "malloc")):
        return None
    if _address(process.malloc) != _address(libc.malloc):
        return None
    return libc


def _backends_started() -> bool:
    try:
        from jax._src.xla_bridge import backends_are_initialized
    except ImportError:  # a JAX without this private function: cannot tell
        warnings.warn(
            "tune_cpu_allocator cannot tell whether a JAX backend has started (this JAX has no "
            "jax._src.xla_bridge.backends_are_initialized); it applies its settings, which "
            "reach only threads that have not allocated yet.",
            stacklevel=3,
        )
        return False
    return bool(backends_are_initialized())


def cpu_allocator_tuned() -> bool:
    """Whether `tune_cpu_allocator` has applied its settings in this process (applied, which
    does not prove that every thread follows them; see its notes)."""
    return _tuned


def tune_cpu_allocator() -> bool:
    """Keep XLA's CPU working memory in the process between calls (Linux with glibc).

    Sets glibc's `malloc` to one arena (`M_ARENA_MAX=1`), no memory maps for large blocks
    (`M_MMAP_MAX=0`) and a 2 GiB trim threshold (`M_TRIM_THRESHOLD`). After a few calls have
    grown the heap, a jitted call reuses the pages the previous call freed instead of having
    the kernel map and zero-fill them again. How many calls that takes depends on the order
    XLA's threads allocate in, which a busy machine changes: in a test on a 2-core machine
    under load, up to 8 calls of a 200 MiB program each grew the heap (and faulted) before
    it settled. On a 2-core Intel Xeon, a `Discrete()` training
    step of batch 8, seq 512, dim 128, 4 layers went from about 49,000 page faults and 96 to
    116 ms of kernel time per call to none and under 3 ms; its wall time did not change
    beyond the machine's noise there (`experiments/bench_peers.py --tune-allocator`; figures
    in `docs/results/performance/results.md`), while the diffusion layer's forward +
    backward on one sequence of 16384 tokens went from 20 to 25 ms to 12 to 14 ms per call
    (`experiments/bench_diffusion.py --tune-allocator`). It saves kernel CPU time; whether
    that saves wall time depends on the machine and the program.

    Call it once, at the very start of a program, **before JAX starts a backend** (any
    computation, `jax.devices()`, `jax.device_put`): XLA's worker threads start with the CPU
    backend, and a thread that has already allocated keeps its arena. Threads of other
    libraries (a PyTorch pool, data-loader threads) that allocated before the call can also
    leave arenas that later threads reuse, which makes the settings partly or wholly
    ineffective; the environment variable below, read before any thread exists, does not
    have that weakness. Importing `jax` and `pdeformer` first is fine.

    The settings hold for the whole process, not only for JAX:

    - memory freed by the program stays mapped to it (up to 2 GiB at the top of the heap),
      so its resident size stays near its peak;
    - every thread allocates from one arena, which serialises `malloc` for programs that
      allocate small blocks heavily from many threads.

    The same settings can be given from outside, before Python starts:
    `GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647`.

    **Returns:**

    `True` when the settings were applied (also on a second call). `False` where the C
    library is not glibc (macOS, Windows, musl) or another `malloc` is preloaded over it,
    where nothing is changed, and where glibc refused a setting (then the others may be
    applied).

    **Raises:**

    `RuntimeError` when a JAX backend has already started in this process.
    """
    global _tuned
    if _tuned:
        return True
    if _backends_started():
        raise RuntimeError(
            "tune_cpu_allocator must be called before JAX starts a backend (the first "
            "computation, jax.devices(), jax.device_put): XLA's CPU threads keep the "
            "allocator arenas they started with. Call it at the start of the program."
        )
    libc = _glibc()
    if libc is None:
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    accepted = [libc.mallopt(param, value) == 1 for param, value in settings]
    _tuned = all(accepted)
    return _tuned
