"""A stiff-aware continuous path for `du/dt = F(u) + D Lap u` with large `D`.

With a large diffusion coefficient the Neumann Laplacian's top eigenvalue `-4 D` forces an
explicit adaptive solver to steps `h ~ 3 / (4 D)` whatever the tolerance. But `D Lap` (per
channel, multi-scale, Neumann, on the valid prefix) is diagonal in the DCT-II basis, with
eigenvalues `-sum_s alpha_s 4 sin^2(pi k d_s / 2n)`, so `exp(h D Lap)` is exact and costs two
transforms. `SplitDiffusion` integrates the field by Strang splitting: half a step of exact
diffusion, an adaptive explicit solve of the non-diffusive field `A + R`, half a step of exact
diffusion, per macro step.
"""

from collections.abc import Sequence

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Scalar

from .depth import (
    AbstractDepth,
    DepthSolution,
    DepthStats,
    _array_tolerances,
    _batched,
    _check_save_at,
    _check_state,
    evaluations_per_step,
)
from .field import Field
from .operators.diffusion import DiffusionOperator


def diffusion_eigenvalues(
    operator: DiffusionOperator, seq: int, n: Array | int
) -> Float[Array, "seq dim"]:
    """Eigenvalues of the operator's rate `sum_s alpha_s Lap_{d_s}` in the DCT-II basis.

    **Arguments:**

    - `operator`: the diffusion operator.
    - `seq`: the sequence length (rows returned).
    - `n`: the number of valid tokens; rows `k >= n` are meaningless.

    **Returns:**

    `lam[k, c] = -sum_s alpha_{s,c} 4 sin^2(pi k d_s / (2 n))`.
    """
    alphas = operator.coefficients()
    dtype = alphas.dtype
    k = jnp.arange(seq, dtype=dtype)
    n = jnp.asarray(n, dtype)
    lam = jnp.zeros((seq, alphas.shape[1]), dtype)
    for s, d in enumerate(operator.dilations):
        w = 4 * jnp.sin(jnp.pi * k * d / (2 * n)) ** 2
        lam = lam - w[:, None] * alphas[s][None, :]
    return lam


def _dct_matrix(seq: int, n: Array, dtype) -> Float[Array, "seq seq"]:
    # Orthonormal DCT-II on the first n of seq tokens (rows k, columns i), zero elsewhere.
    k = jnp.arange(seq, dtype=dtype)[:, None]
    i = jnp.arange(seq, dtype=dtype)[None, :]
    nf = jnp.asarray(n, dtype)
    c = jnp.cos(jnp.pi * k * (2 * i + 1) / (2 * nf))
    scale = jnp.where(k == 0, jnp.sqrt(1 / nf), jnp.sqrt(2 / nf))
    valid = (k < nf) & (i < nf)
    return jnp.where(valid, scale * c, jnp.zeros_like(c))


def exact_diffusion(
    operator: DiffusionOperator,
    u: Float[Array, "seq dim"],
    mask: Bool[Array, " seq"] | None,
    h: Scalar | float,
) -> Float[Array, "seq dim"]:
    """`exp(h * operator) u`: the exact flow of the diffusion rate over depth `h`.

    Without a mask this uses `jax.scipy.fft.dct`/`idct` (type 2, orthonormal):
    `O(seq log seq * dim)`. With a mask the valid length is data-dependent, so a dense
    `(seq, seq)` DCT matrix for that length is built from cosines: `O(seq^2 * dim)` time and
    `O(seq^2)` memory, fine up to a few thousand tokens. Pads are returned unchanged.

    **Arguments:**

    - `operator`: the field's `DiffusionOperator` (any `alpha_max`, `None` included).
    - `u`: token states of one sequence.
    - `mask`: `True` on valid tokens (valid first), or `None`.
    - `h`: the depth step, `>= 0`.

    **Returns:**

    The diffused states, same shape as `u`.
    """
    seq = u.shape[0]
    h = jnp.asarray(h, u.dtype)
    if mask is None:
        lam = diffusion_eigenvalues(operator, seq, seq).astype(u.dtype)
        uh = jax.scipy.fft.dct(u, type=2, axis=0, norm="ortho")
        return jax.scipy.fft.idct(uh * jnp.exp(h * lam), type=2, axis=0, norm="ortho")
    n = jnp.maximum(jnp.sum(mask.astype(jnp.int32)), 1)
    lam = diffusion_eigenvalues(operator, seq, n).astype(u.dtype)
    c = _dct_matrix(seq, n, u.dtype)
    out = c.T @ (jnp.exp(h * lam) * (c @ u))
    return jnp.where(mask[:, None], out, u)


class SplitDiffusion(AbstractDepth):
    """Strang splitting with exact diffusion sub-steps, for fields with a large `D Lap u`.

    Depth `[0, T]` is cut into macro steps at multiples of `macro_step`, at the field's jump
    times and at the requested save depths (so every piece is smooth and saving is exact).
    Over each piece `[t, t + H]`:

    1. `u <- exp(H/2 D Lap) u` exactly (DCT; no field evaluations);
    2. `u <-` an adaptive explicit diffrax solve of the field *without* its diffusion term;
    3. `u <- exp(H/2 D Lap) u`.

    The non-stiff part keeps its own adaptive steps; the stiff part costs two exact
    diffusions per piece. The method is second order in `H` (splitting error
    `O(H^2 [F, D Lap])`) on top of the inner tolerance. `stats.nfe` counts the inner solves'
    field evaluations only; `diffusion_applications` counts the exact diffusions (each a
    forward and an inverse transform per sequence).

    **Arguments:**

    - `solver`: an explicit diffrax solver for the non-diffusive field (default Tsit5).
    - `controller`: an adaptive step-size controller (default
      `diffrax.PIDController(rtol=1e-3, atol=1e-5)`).
    - `adjoint`: how to differentiate the inner solves (default recursive checkpointing).
    - `macro_step`: the splitting step `H`; default the field's discrete step, so macro
      steps align with the field's jumps.
    - `max_steps`: the most steps of each inner solve.
    - `throw`: raise on failure of an inner solve.
    """

    solver: diffrax.AbstractSolver
    controller: diffrax.AbstractAdaptiveStepSizeController
    adjoint: diffrax.AbstractAdjoint
    macro_step: float | None = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    throw: bool = eqx.field(static=True)

    def __init__(
        self,
        solver: diffrax.AbstractSolver | None = None,
        controller: diffrax.AbstractStepSizeController | None = None,
        adjoint: diffrax.AbstractAdjoint | None = None,
        *,
        macro_step: float | None = None,
        max_steps: int = 4096,
        throw: bool = True,
    ):
        self.solver = diffrax.Tsit5() if solver is None else solver
        if controller is None:
            controller = diffrax.PIDController(rtol=1e-3, atol=1e-5)
        if not isinstance(controller, diffrax.AbstractAdaptiveStepSizeController):
            raise ValueError(
                "controller must be an adaptive diffrax controller, e.g. "
                f"diffrax.PIDController(rtol=1e-3, atol=1e-5); got {controller!r}."
            )
        evaluations_per_step(self.solver)  # validates: explicit solvers only
        self.controller = _array_tolerances(controller)
        self.adjoint = diffrax.RecursiveCheckpointAdjoint() if adjoint is None else adjoint
        if macro_step is not None and not macro_step > 0:
            raise ValueError(
                f"macro_step must be > 0; got macro_step={macro_step}. Pass e.g. 0.5, or None "
                "for the field's discrete step."
            )
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be a positive int; got max_steps={max_steps!r}.")
        self.macro_step = None if macro_step is None else float(macro_step)
        self.max_steps = max_steps
        self.throw = throw

    def edges(self, field: Field, save_at: Sequence[float] | None = None) -> np.ndarray:
        """The piece boundaries in `[0, T]`: the macro grid, jumps and save depths."""
        t1 = field.t1
        h = field.discrete_step if self.macro_step is None else self.macro_step
        num = max(1, int(np.ceil(t1 / h - 1e-9)))
        grid = np.minimum(np.arange(num + 1) * h, t1)
        extra = list(field.jump_times())
        if save_at is not None:
            extra += [float(t) for t in save_at]
        edges = np.unique(np.round(np.concatenate([grid, extra, [0.0, t1]]), 12))
        return edges

    def diffusion_applications(self, field: Field, save_at: Sequence[float] | None = None) -> int:
        """Exact diffusion applications per sequence (two per piece; each two transforms)."""
        if field.diffusion is None:
            return 0
        return 2 * (len(self.edges(field, save_at)) - 1)

    def __call__(self, field, u0, mask=None, *, save_at=None):
        _check_state(u0, mask)
        ts_save = _check_save_at(save_at, field.t1)
        edges = self.edges(field, None if ts_save is None else ts_save.tolist())
        dtype = u0.dtype
        op = field.diffusion
        # The non-stiff part: the same field without its diffusion term.
        smooth = eqx.tree_at(lambda f: f.diffusion, field, None, is_leaf=lambda x: x is None)
        has_mask = mask is not None

        def diffuse(u, h):
            if op is None:
                return u
            fn = lambda v, m: exact_diffusion(op, v, m, h)
            for _ in range(u.ndim - 2):
                fn = jax.vmap(fn, in_axes=(0, 0 if has_mask else None))
            return fn(u, mask)

        def rate(t, u, args):
            m, anchor = args
            fn = _batched(lambda t, v, mm: smooth(t, v, mm, anchor=anchor), u0.ndim, has_mask)
            return fn(t, u, m)

        term = diffrax.ODETerm(rate)
        starts = jnp.asarray(edges[:-1], dtype)
        ends = jnp.asarray(edges[1:], dtype)

        def piece(u, t01):
            t0, t1 = t01
            width = t1 - t0
            # Each piece is smooth: the anchor (its midpoint) tells the field which side of a
            # jump at the piece's ends is meant.
            anchor = (t0 + t1) / 2
            u = diffuse(u, width / 2)
            sol = diffrax.diffeqsolve(
                term,
                self.solver,
                t0=t0,
                t1=t1,
                dt0=width,
                y0=u,
                args=(mask, anchor),
                stepsize_controller=self.controller,
                adjoint=self.adjoint,
                saveat=diffrax.SaveAt(t1=True),
                max_steps=self.max_steps,
                throw=self.throw,
            )
            u = diffuse(sol.ys[-1], width / 2)
            counts = jnp.stack(
                [
                    jnp.asarray(sol.stats["num_steps"], jnp.int32),
                    jnp.asarray(sol.stats["num_accepted_steps"], jnp.int32),
                    jnp.asarray(sol.stats["num_rejected_steps"], jnp.int32),
                    (sol.result == diffrax.RESULTS.successful).astype(jnp.int32),
                ]
            )
            return u, (u if ts_save is not None else None, counts)

        u1, (traj, counts) = jax.lax.scan(piece, u0, (starts, ends))
        total = jnp.sum(counts, axis=0)
        num_pieces = len(edges) - 1
        per_step, fsal = evaluations_per_step(self.solver)
        # Every piece is a fresh solve: an FSAL method evaluates its first stage once more.
        nfe = per_step * total[0] + (num_pieces if fsal else 0)
        stats = DepthStats(
            num_steps=total[0],
            num_accepted_steps=total[1],
            num_rejected_steps=total[2],
            nfe=jnp.asarray(nfe, jnp.int32),
            success=total[3] == num_pieces,
        )
        if ts_save is None:
            return DepthSolution(u=u1, ts=None, us=None, stats=stats)
        traj = jnp.concatenate([u0[None], traj], axis=0)
        idx = np.searchsorted(edges, np.round(ts_save, 12))
        return DepthSolution(u=u1, ts=jnp.asarray(ts_save, dtype), us=traj[idx], stats=stats)
