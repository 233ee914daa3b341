"""`KeepResidualsAdjoint`: backpropagation through a solve that recomputes no step.

diffrax's `RecursiveCheckpointAdjoint` (what `Continuous` uses by default) keeps copies of
the solver *state* and, on the backward pass, runs every step's forward again to get the
intermediate values its backward needs. That makes a training step cost about one extra
forward pass of the whole solve. This adjoint keeps those intermediate values (the
*residuals* of each step's vector-Jacobian product) from the forward pass instead, in a
fixed number of slots, one per loop iteration (accepted or rejected step), the way a
tape-based framework such as PyTorch does. The backward pass then only runs each step's
backward. It trades memory for time: each slot holds what a step's backward reads. With
diffrax's Runge-Kutta solvers that is the step's stage inputs (about nine states in
`experiments/bench_memory.py`), their stage loop being checkpointed itself; with
`pdeformer.Unrolled` it is every intermediate of the step (about 116 states there).

The loop is a `jax.lax.while_loop` whose forward, under differentiation, records
`jax.vjp`'s residuals of every iteration; its backward walks them in reverse. Everything
else (the step-size controller, saving, events) is diffrax's own loop body, unchanged, so
the gradients are those of `RecursiveCheckpointAdjoint` up to the order of floating-point
additions.
"""

import functools as ft

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu

# Equinox's own while loops start from this rewrite (`equinox.internal.while_loop`): it
# turns diffrax's write-only buffers into plain arrays written in place, makes the loop
# condition unbatched under `jax.vmap` (finished batch members keep their value), and
# stops the loop at `max_steps`. It is not exported, so it is imported from its module;
# `tests/test_adjoint.py` fails if that moves, and the adjoint refuses to be built.
try:
    from equinox.internal._loop.common import common_rewrite
except ImportError:  # pragma: no cover - depends on the installed equinox
    common_rewrite = None

__all__ = ["KeepResidualsAdjoint"]


class KeepResidualsAdjoint(diffrax.AbstractAdjoint):
    """Differentiate a solve by keeping every step's residuals: no step is recomputed.

    Use it as any diffrax adjoint: `pf.Continuous(adjoint=pf.KeepResidualsAdjoint(slots=32))`
    or `diffrax.diffeqsolve(..., adjoint=pf.KeepResidualsAdjoint(slots=32))`.

    - `slots`: how many loop iterations (accepted plus rejected steps) the forward pass can
      record. Memory is `slots` (at most `max_steps`) times one step's residuals, allocated
      and zero-filled on every differentiated call, whether used or not (`jax.lax.empty`
      lowers to zeros on the CPU in jax 0.10, so there is no cheaper allocation). A
      differentiated solve that needs more iterations stops with a runtime error
      (`equinox.error_if`); where equinox's runtime errors are turned off
      (`EQX_ON_ERROR=off` or `nan`) its gradients are NaN instead. A solve that is not
      differentiated has no such limit.

    Against `RecursiveCheckpointAdjoint` it saves the recomputation of each step's forward
    on the backward pass, at the cost of writing the residuals on the forward pass. (With
    diffrax's Runge-Kutta solvers each stage is still evaluated once more inside the step's
    own backward pass; `pdeformer.Unrolled` removes that too, for larger slots.) What
    that buys on a given machine is measured by `experiments/bench_peers.py` and
    `experiments/bench_memory.py` (`docs/results/performance/results.md`).

    Forward-mode differentiation (`jax.jvp`) is not supported, as with
    `RecursiveCheckpointAdjoint`. Rejected steps take slots too: a solve with many
    rejections needs more.
    """

    slots: int = 32

    def __check_init__(self):
        if common_rewrite is None:  # pragma: no cover - depends on the installed equinox
            raise ImportError(
                "KeepResidualsAdjoint needs equinox.internal._loop.common.common_rewrite, "
                f"which equinox {eqx.__version__} does not have."
            )
        if not isinstance(self.slots, int) or isinstance(self.slots, bool):
            raise TypeError(f"slots must be an int; got {self.slots!r}.")
        if self.slots < 1:
            raise ValueError(f"slots must be at least 1; got {self.slots}.")

    def loop(
        self,
        *,
        terms,
        saveat,
        init_state,
        max_steps,
        throw,
        passed_solver_state,
        passed_controller_state,
        **kwargs,
    ):
        del throw, passed_solver_state, passed_controller_state
        if max_steps is None:
            raise ValueError(
                "KeepResidualsAdjoint needs a finite max_steps (diffeqsolve(..., max_steps=N))."
            )
        # Saving at several times runs a nested loop inside each step; it must be reverse
        # differentiable, as under `RecursiveCheckpointAdjoint`.
        inner_while_loop = ft.partial(eqxi.while_loop, kind="checkpointed")
        # The loop stops after `max_steps` iterations: no more slots can be filled.
        outer_while_loop = ft.partial(residual_while_loop, slots=min(self.slots, max_steps))
        return self._loop(
            terms=terms,
            saveat=saveat,
            init_state=init_state,
            max_steps=max_steps,
            inner_while_loop=inner_while_loop,
            outer_while_loop=outer_while_loop,
            **kwargs,
        )


def residual_while_loop(cond_fun, body_fun, init_val, *, max_steps=None, buffers=None, slots):
    """As `jax.lax.while_loop`, reverse-mode differentiable by keeping the residuals of at
    most `slots` iterations (see `KeepResidualsAdjoint`). `max_steps` bounds the
    iterations; `buffers` marks leaves of the carry written in place (as
    `equinox.internal.while_loop`)."""
    # `common_rewrite` turns the carry's leaves into arrays itself.
    cond_, body_, init_, _ = common_rewrite(
        cond_fun, body_fun, init_val, max_steps, buffers, makes_false_steps=False
    )
    # The closed-over values of the body (the vector field's parameters) become leaves of
    # `body_`, so that they can be differentiated.
    cond_ = eqx.filter_closure_convert(cond_, init_)
    cond_ = jtu.tree_map(lambda x: lax.stop_gradient(x) if eqx.is_array(x) else x, cond_)
    body_ = eqx.filter_closure_convert(body_, init_)
    _, _, _, final_val = _residual_loop((init_, body_), cond_, slots)
    return final_val


@eqx.filter_custom_vjp
def _residual_loop(vjp_arg, cond_fun, slots):
    # Not differentiated: a plain loop, no slots.
    del slots
    init_val, body_fun = vjp_arg
    return lax.while_loop(lambda v: cond_fun(v), lambda v: body_fun(v), init_val)


class _Tape(eqx.Module):
    """How one iteration's `jax.vjp` pullback is rebuilt from what the slots keep."""

    treedef: jtu.PyTreeDef = eqx.field(static=True)
    # For each leaf of the pullback: its index among the body's leaves when it is one of
    # them (loop-invariant: kept once, not per slot), else None (kept per slot).
    invariant: tuple = eqx.field(static=True)


def _step_vjp(body_fun, perturb_body, val):
    """One iteration and its pullback, differentiated with respect to the perturbed leaves
    of the body and every floating-point leaf of the carry."""
    diff_body, nondiff_body = eqx.partition(body_fun, perturb_body)
    diff_val, nondiff_val = eqx.partition(val, eqx.is_inexact_array)

    def step(_diff_body, _diff_val):
        out = eqx.combine(_diff_body, nondiff_body)(eqx.combine(_diff_val, nondiff_val))
        return eqx.partition(out, eqx.is_inexact_array)

    diff_out, pullback, nondiff_out = jax.vjp(step, diff_body, diff_val, has_aux=True)
    return eqx.combine(diff_out, nondiff_out), pullback


def _split_pullback(pullback, body_fun):
    leaves, treedef = jtu.tree_flatten(pullback)
    body_ids = {id(x): i for i, x in enumerate(jtu.tree_leaves(body_fun))}
    invariant = tuple(body_ids.get(id(x)) for x in leaves)
    kept = [x for x, i in zip(leaves, invariant, strict=True) if i is None]
    return _Tape(treedef, invariant), kept


@_residual_loop.def_fwd
def _residual_loop_fwd(perturbed, vjp_arg, cond_fun, slots):
    _, perturb_body = perturbed
    init_val, body_fun = vjp_arg
    tapes = []

    def record(val):
        out, pullback = _step_vjp(body_fun, perturb_body, val)
        tape, kept = _split_pullback(pullback, body_fun)
        tapes.append(tape)
        return out, kept

    # The shapes of one iteration's residuals, to allocate the slots.
    kept_shapes = jax.eval_shape(lambda v: record(v)[1], init_val)
    store = [jnp.zeros((slots, *s.shape), s.dtype) for s in kept_shapes]

    def body(carry):
        i, val, store = carry
        out, kept = record(val)
        for buf, x in zip(store, kept, strict=True):
            if (x.shape, x.dtype) != (buf.shape[1:], buf.dtype):
                raise AssertionError(
                    f"KeepResidualsAdjoint: a residual of shape {x.shape} ({x.dtype}) does "
                    f"not fit its slot {buf.shape[1:]} ({buf.dtype}); please report this."
                )
        store = [
            lax.dynamic_update_index_in_dim(buf, x, jnp.minimum(i, slots - 1), axis=0)
            for buf, x in zip(store, kept, strict=True)
        ]
        return i + 1, out, store

    num, final_val, store = lax.while_loop(
        lambda c: cond_fun(c[1]), body, (jnp.array(0, jnp.int32), init_val, store)
    )
    # Every trace of the iteration (shapes, then the loop: once, or once per iteration under
    # `jax.disable_jit`) must keep the same leaves.
    if any(t.invariant != tapes[0].invariant for t in tapes):
        raise AssertionError("KeepResidualsAdjoint: the loop body traced differently twice.")
    num = eqx.error_if(
        num,
        num > slots,
        f"KeepResidualsAdjoint(slots={slots}): the solve took more loop iterations "
        "(accepted plus rejected steps) than there are slots to keep their residuals. "
        "Pass more slots, a looser tolerance, or use the default "
        "RecursiveCheckpointAdjoint, which recomputes instead.",
    )
    return final_val, (num, store, tapes[-1])


@_residual_loop.def_bwd
def _residual_loop_bwd(residuals, grad_final_val, perturbed, vjp_arg, cond_fun, slots):
    del cond_fun
    num, store, tape = residuals
    _, perturb_body = perturbed
    init_val, body_fun = vjp_arg
    body_leaves = jtu.tree_leaves(body_fun)
    diff_val = eqx.filter(init_val, eqx.is_inexact_array)
    diff_body = eqx.filter(body_fun, perturb_body)
    # Cotangents of the carry's floating-point leaves; None (not differentiated) is zero.
    ct_val = jtu.tree_map(
        lambda x, g: None if x is None else (jnp.zeros_like(x) if g is None else g),
        diff_val,
        eqx.filter(grad_final_val, eqx.is_inexact_array, replace=None),
        is_leaf=lambda x: x is None,
    )
    ct_body = jtu.tree_map(jnp.zeros_like, diff_body)

    def body(carry):
        i, ct_val, ct_body = carry
        i = i - 1
        per_slot = iter([lax.dynamic_index_in_dim(buf, i, keepdims=False) for buf in store])
        leaves = [next(per_slot) if j is None else body_leaves[j] for j in tape.invariant]
        pullback = jtu.tree_unflatten(tape.treedef, leaves)
        d_body, d_val = pullback(ct_val)
        return i, d_val, jtu.tree_map(jnp.add, ct_body, d_body)

    # `num > slots` has raised above unless equinox's runtime errors are off (or turned into
    # NaN, which makes `num` the largest int): the tape is then incomplete, and the
    # gradients are NaN rather than those of its last `slots` iterations.
    overflow = num > slots
    start = jnp.minimum(num, slots)
    _, ct_val, ct_body = lax.while_loop(lambda c: c[0] > 0, body, (start, ct_val, ct_body))
    ct_val, ct_body = jtu.tree_map(
        lambda x: jnp.where(overflow, jnp.full_like(x, jnp.nan), x), (ct_val, ct_body)
    )
    perturb_val, _ = perturbed
    ct_init = jtu.tree_map(
        lambda g, p: g if p else None,
        eqx.combine(ct_val, eqx.filter(init_val, eqx.is_inexact_array, inverse=True)),
        perturb_val,
    )
    return ct_init, ct_body
