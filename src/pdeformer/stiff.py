"""A stiff-aware continuous path for `du/dt = N(t, u) + D Lap u` with large `D`.

With a large diffusion coefficient the Neumann Laplacian's top eigenvalue `-4 D` holds an
explicit adaptive solver to steps `h ~ 3.5 / (4 D)` whatever the tolerance. But `D Lap`
(per channel, multi-scale, Neumann, on the valid prefix of each sequence) is diagonal in the
DCT-II basis, with eigenvalues `-sum_s alpha_s 4 sin^2(pi k d_s / 2n)`: every function of it
(`exp(h D Lap)` and the `phi`-functions) is a scalar per mode and costs two transforms.

`ExponentialContinuous` integrates the field with an adaptive exponential Runge–Kutta method
(`ExpRK3`, `ExpRK2`): the diffusion is integrated exactly, only the attention and reaction
(`N`) are approximated, and an embedded error estimate drives diffrax's step-size controllers,
so the step follows the tolerance and the smoothness of `N`, not `D`.
"""

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Scalar

from .depth import (
    AbstractDepth,
    Continuous,
    DepthSolution,
    DepthStats,
    _check_save_at,
    _check_state,
    _clip_controller,
    _Rate,
)
from .operators.diffusion import DiffusionOperator

# ---------------------------------------------------------------------------------------
# The diffusion operator in its eigenbasis.
# ---------------------------------------------------------------------------------------


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


class AbstractSpectralTerm(diffrax.AbstractTerm):
    """A linear term `L y = V (lam * V^T y)` with `V` orthogonal and known eigenvalues.

    Exponential integrators need only three things of `L`: its eigenvalues and the two
    transforms. Entries that `V` does not cover (pads) are frozen: `L` is zero there and
    `from_modes` copies them from a reference state.
    """

    @abc.abstractmethod
    def eigenvalues(self) -> Array:
        """The eigenvalues, broadcastable against `to_modes(y)`."""

    @abc.abstractmethod
    def to_modes(self, y: Array) -> Array:
        """`V^T y`: the coefficients of `y` in the eigenbasis."""

    @abc.abstractmethod
    def from_modes(self, modes: Array, like: Array) -> Array:
        """`V modes`, with the frozen entries (pads) taken from `like`."""

    def vf(self, t, y, args):
        return self.from_modes(self.eigenvalues() * self.to_modes(y), jnp.zeros_like(y))

    def contr(self, t0, t1, **kwargs):
        return t1 - t0

    def prod(self, vf, control):
        return jax.tree.map(lambda v: control * v, vf)


class DiffusionTerm(AbstractSpectralTerm):
    """The field's diffusion rate `D Lap u` as a diffrax term diagonalised by the DCT-II.

    The eigenvalues and, for masked batches, the per-sequence DCT matrices are computed once
    at construction (the valid length `n` of each sequence is fixed during a solve); they are
    differentiable in the operator's parameters. Unmasked states use `jax.scipy.fft.dct`
    (`O(seq log seq)` per channel); masked states a dense `(seq, seq)` DCT-II matrix per
    sequence for its valid length (`O(seq^2)` memory per sequence, fine up to a few thousand
    tokens). Pads are frozen: their rate is zero and they never mix with valid tokens.

    **Arguments:**

    - `operator`: the field's `DiffusionOperator` (any `alpha_max`, `None` included).
    - `u`: a state of the shape and dtype to be integrated, `(*batch, seq, dim)`.
    - `mask`: `True` on valid tokens (valid first), shape `(*batch, seq)`, or `None`.
    """

    lam: Float[Array, "*batch seq dim"]
    basis: Float[Array, "*batch seq seq"] | None
    mask: Bool[Array, "*batch seq"] | None

    def __init__(
        self,
        operator: DiffusionOperator,
        u: Float[Array, "*batch seq dim"],
        mask: Bool[Array, "*batch seq"] | None = None,
    ):
        _check_state(u, mask)
        seq, dtype = u.shape[-2], u.dtype
        if mask is None:
            self.lam = diffusion_eigenvalues(operator, seq, seq).astype(dtype)
            self.basis = None
            self.mask = None
            return
        n = jnp.maximum(jnp.sum(mask.astype(jnp.int32), axis=-1), 1).reshape(-1)
        k = jnp.arange(seq)[:, None]

        def per_sequence(n):
            lam = diffusion_eigenvalues(operator, seq, n).astype(dtype)
            return jnp.where(k < n, lam, jnp.zeros_like(lam)), _dct_matrix(seq, n, dtype)

        lam, basis = jax.vmap(per_sequence)(n)
        self.lam = lam.reshape(*mask.shape, -1)
        self.basis = basis.reshape(*mask.shape, seq)
        self.mask = mask

    def eigenvalues(self) -> Float[Array, "*batch seq dim"]:
        return self.lam

    def to_modes(self, y):
        if self.basis is None:
            return jax.scipy.fft.dct(y, type=2, axis=-2, norm="ortho")
        return jnp.einsum("...ki,...id->...kd", self.basis, y, precision=jax.lax.Precision.HIGHEST)

    def from_modes(self, modes, like):
        if self.basis is None:
            return jax.scipy.fft.idct(modes, type=2, axis=-2, norm="ortho")
        out = jnp.einsum(
            "...ki,...kd->...id", self.basis, modes, precision=jax.lax.Precision.HIGHEST
        )
        return jnp.where(self.mask[..., None], out, like)


def exact_diffusion(
    operator: DiffusionOperator,
    u: Float[Array, "seq dim"],
    mask: Bool[Array, " seq"] | None,
    h: Scalar | float,
) -> Float[Array, "seq dim"]:
    """`exp(h * operator) u`: the exact flow of the diffusion rate over depth `h`.

    Uses the same transforms as `DiffusionTerm` (fast DCT without a mask, a dense DCT
    matrix for the valid length with one). Pads are returned unchanged.

    **Arguments:**

    - `operator`: the field's `DiffusionOperator` (any `alpha_max`, `None` included).
    - `u`: token states of one sequence.
    - `mask`: `True` on valid tokens (valid first), or `None`.
    - `h`: the depth step, `>= 0`.

    **Returns:**

    The diffused states, same shape as `u`.
    """
    term = DiffusionTerm(operator, u, mask)
    lam = term.eigenvalues()
    return term.from_modes(jnp.exp(jnp.asarray(h, lam.dtype) * lam) * term.to_modes(u), u)


# ---------------------------------------------------------------------------------------
# phi-functions and exponential Runge–Kutta methods.
# ---------------------------------------------------------------------------------------

_SERIES_TERMS = 18  # |z| < 1: the remainder is below 1/(18 + j)! < 1e-15 relative


def phi(j: int, z: Array) -> Array:
    """The exponential integrators' `phi_j(z) = sum_k z^k / (k + j)!`, elementwise.

    `phi_0 = exp`, `phi_1(z) = (e^z - 1) / z`, `phi_{j+1}(z) = (phi_j(z) - 1/j!) / z`. The
    recurrence cancels catastrophically near `z = 0`, so `|z| < 1` uses the Taylor series
    (both branches are kept finite, so gradients are too).

    **Arguments:**

    - `j`: the index, `>= 0`.
    - `z`: the argument (for diffusion `h * lam <= 0`).

    **Returns:**

    `phi_j(z)`, same shape and dtype as `z`.
    """
    if j < 0:
        raise ValueError(f"phi needs j >= 0; got j={j}.")
    if j == 0:
        return jnp.exp(z)
    small = jnp.abs(z) < 1
    zs = jnp.where(small, z, jnp.zeros_like(z))
    series = jnp.full_like(z, 1 / math.factorial(_SERIES_TERMS + j))
    for k in reversed(range(_SERIES_TERMS)):
        series = series * zs + 1 / math.factorial(k + j)
    zl = jnp.where(small, jnp.ones_like(z), z)
    rec = jnp.expm1(zl) / zl
    for i in range(2, j + 1):
        rec = (rec - 1 / math.factorial(i - 1)) / zl
    return jnp.where(small, series, rec)


# A coefficient of an exponential Runge–Kutta tableau: `sum weight * phi_j(scale * z)`.
_Coefficient = tuple[tuple[float, int, float], ...]


@dataclasses.dataclass(frozen=True)
class ExponentialTableau:
    """The coefficients of an explicit exponential Runge–Kutta method with an error estimate.

    For `u' = L u + N(t, u)` and a step `h` (`z = h L`), with `N_i = N(t0 + c_i h, U_i)`:

        U_i = exp(c_i z) u0 + h sum_{j<i} a_ij(z) N_j
        u1  = exp(z) u0     + h sum_i   b_i(z)  N_i
        err =                 h sum_i   e_i(z)  N_i      (e = b - b_embedded)

    Each coefficient is a tuple of terms `(weight, j, scale)` meaning
    `weight * phi_j(scale * z)`.

    **Arguments:**

    - `c`: the stage depths, `c[0] = 0`.
    - `a`: `a[i][j]` for `j < i` (row `i` has `i` coefficients).
    - `b`: the weights of the solution.
    - `e`: the weights of the error estimate.
    - `order`: the order of `b` (the estimate is one order lower).
    """

    c: tuple[float, ...]
    a: tuple[tuple[_Coefficient, ...], ...]
    b: tuple[_Coefficient, ...]
    e: tuple[_Coefficient, ...]
    order: int

    def __post_init__(self):
        s = len(self.c)
        if self.c[0] != 0 or len(self.a) != s or len(self.b) != s or len(self.e) != s:
            raise ValueError(f"malformed tableau: {s} stages but a, b, e of other lengths.")
        if any(len(row) != i for i, row in enumerate(self.a)):
            raise ValueError("malformed tableau: row i of a must have i coefficients.")

    @property
    def num_stages(self) -> int:
        return len(self.c)


class AbstractExponentialRK(diffrax.AbstractAdaptiveSolver):
    """An explicit exponential Runge–Kutta method with an embedded error estimate.

    Solves `du/dt = N(t, u) + L u` given as
    `diffrax.MultiTerm(diffrax.ODETerm(N), spectral_term)`, where `spectral_term` is an
    `AbstractSpectralTerm` (e.g. `DiffusionTerm`): the linear part is integrated exactly in
    its eigenbasis and only `N` is approximated, so stability never limits the step and the
    error estimate (which measures the approximation of `N`) follows the tolerance. Each
    step costs `num_stages` evaluations of `N` (no FSAL), `num_stages + 1` forward and
    `num_stages + 1` inverse transforms. Dense output is linear between steps: save where
    the steps land (`ExponentialContinuous` makes the steps land on the save depths).
    """

    term_structure: ClassVar = diffrax.MultiTerm[tuple[diffrax.AbstractTerm, AbstractSpectralTerm]]
    interpolation_cls: ClassVar[Callable[..., diffrax.LocalLinearInterpolation]] = (
        diffrax.LocalLinearInterpolation
    )
    tableau: eqx.AbstractClassVar[ExponentialTableau]

    @property
    def num_stages(self) -> int:
        """Evaluations of the non-linear part per step (rejected steps cost the same)."""
        return self.tableau.num_stages

    def order(self, terms):
        return self.tableau.order

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del solver_state, made_jump
        nonlinear, wrapped = terms.terms
        linear = wrapped
        while not isinstance(linear, AbstractSpectralTerm):
            linear = linear.term  # diffrax wraps terms (e.g. for the direction of time)
        lam = linear.eigenvalues()
        h = jnp.asarray(wrapped.contr(t0, t1), lam.dtype)
        z = h * lam
        cache = {}

        def coefficient(terms_):
            out = None
            for weight, j, scale in terms_:
                if (j, scale) not in cache:
                    cache[(j, scale)] = phi(j, z if scale == 1 else scale * z)
                term = weight * cache[(j, scale)]
                out = term if out is None else out + term
            return out

        def combine(start, scale, weights, stages):
            # exp(scale z) start + h sum_j weights_j(z) stages_j, all in modes.
            acc = coefficient(((1.0, 0, scale),)) * start
            for w, k in zip(weights, stages, strict=True):
                if w:
                    acc = acc + h * coefficient(w) * k
            return acc

        tab = self.tableau
        y0_modes = linear.to_modes(y0)
        stage_modes = []
        for i, ci in enumerate(tab.c):
            if i == 0:
                u = y0
            else:
                u = linear.from_modes(combine(y0_modes, ci, tab.a[i], stage_modes), y0)
            n = nonlinear.vf(t0 + ci * (t1 - t0), u, args)
            stage_modes.append(linear.to_modes(n))
        y1 = linear.from_modes(combine(y0_modes, 1.0, tab.b, stage_modes), y0)
        err_modes = None
        for w, k in zip(tab.e, stage_modes, strict=True):
            if w:
                term = h * coefficient(w) * k
                err_modes = term if err_modes is None else err_modes + term
        y_error = linear.from_modes(err_modes, jnp.zeros_like(y0))
        dense_info = dict(y0=y0, y1=y1)
        return y1, y_error, dense_info, None, diffrax.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


class ExpRK2(AbstractExponentialRK):
    """The exponential Heun method (Cox–Matthews ETD2RK) with exponential Euler embedded.

        U2 = exp(z) u0 + h phi_1(z) N(t0, u0)
        u1 = U2 + h phi_2(z) (N(t1, U2) - N(t0, u0))

    Stiff order 2 (Hochbruck–Ostermann 2005), 2 evaluations per step; the error estimate
    is `u1 - U2`, of local order 2.
    """

    tableau: ClassVar[ExponentialTableau] = ExponentialTableau(
        c=(0.0, 1.0),
        a=((), (((1.0, 1, 1.0),),)),
        b=(((1.0, 1, 1.0), (-1.0, 2, 1.0)), ((1.0, 2, 1.0),)),
        e=(((-1.0, 2, 1.0),), ((1.0, 2, 1.0),)),
        order=2,
    )


class ExpRK3(AbstractExponentialRK):
    """The three-stage exponential Runge–Kutta method of Hochbruck and Ostermann (2005),
    with `c = (0, 1/3, 2/3)` and an embedded second-order method.

        a21 = 1/3 phi_1(z/3)
        a31 = 2/3 phi_1(2z/3) - 4/3 phi_2(2z/3),   a32 = 4/3 phi_2(2z/3)
        b   = (phi_1 - 3/2 phi_2, 0, 3/2 phi_2)       (order 3)
        b^  = (phi_1 - 3 phi_2, 3 phi_2, 0)           (order 2)

    The error estimate is `3/2 h phi_2(z) (N_1 - 2 N_2 + N_3)`, a second difference of the
    stages: local order 3. Order 3 for non-stiff problems (and measured 3.0 at `D = 1`);
    in the stiff limit the method meets the stiff order conditions up to order 3 in their
    weakened form (`sum_i b_i c_i^2 / 2 = phi_3` only at `z = 0`). With rough initial states
    and `|h lam|` large the observed order of *constant* steps drops (an initial layer in
    which `N(u(t))` varies on the fast time scale `1 / |lam|`); the adaptive controller
    resolves that layer with short first steps. 3 evaluations per step.
    """

    tableau: ClassVar[ExponentialTableau] = ExponentialTableau(
        c=(0.0, 1 / 3, 2 / 3),
        a=(
            (),
            (((1 / 3, 1, 1 / 3),),),
            (((2 / 3, 1, 2 / 3), (-4 / 3, 2, 2 / 3)), ((4 / 3, 2, 2 / 3),)),
        ),
        b=(((1.0, 1, 1.0), (-1.5, 2, 1.0)), (), ((1.5, 2, 1.0),)),
        e=(((1.5, 2, 1.0),), ((-3.0, 2, 1.0),), ((1.5, 2, 1.0),)),
        order=3,
    )


# ---------------------------------------------------------------------------------------
# The integrator in depth.
# ---------------------------------------------------------------------------------------


class ExponentialContinuous(AbstractDepth):
    """The field's flow with its diffusion `D Lap u` integrated exactly: for large `D`.

    An adaptive exponential Runge–Kutta method (`ExpRK3` by default) on
    `du/dt = N(t, u) + D Lap u`, where `N` is the field without its diffusion term. The
    diffusion enters through its DCT-II eigenvalues (`DiffusionTerm`), so the step size is
    set by the tolerance and the smoothness of `N` only: its cost does not grow with `D`,
    where an explicit solver's grows linearly. The controller gets the field's jump times
    (as `Continuous` does) and steps that land exactly on the save depths.

    Each step costs `solver.num_stages` field evaluations, rejected steps included; they are
    counted in `stats.nfe` (the method is not FSAL, so nothing else is evaluated).

    **Arguments:**

    - `solver`: an `AbstractExponentialRK` (default `ExpRK3()`).
    - `controller`: an adaptive step-size controller (default
      `diffrax.PIDController(rtol=1e-3, atol=1e-5)`), with the tolerances checked and
      stored as arrays as `Continuous` does.
    - `adjoint`: how to differentiate (default, as for `Continuous`, diffrax's
      `RecursiveCheckpointAdjoint` keeping `min(16, max_steps)` steps;
      `diffrax.BacksolveAdjoint` is not supported).
    - `dt0`: the initial step; default the field's discrete step.
    - `max_steps`, `throw`, `matmul_precision`: as for `Continuous`.

    **Raises:**

    `ValueError` at construction for a solver that is not exponential, a controller that is
    not adaptive or a backsolve adjoint; at call time for a field without a diffusion term
    (use `Continuous`).
    """

    solver: AbstractExponentialRK
    controller: diffrax.AbstractAdaptiveStepSizeController
    adjoint: diffrax.AbstractAdjoint
    dt0: float | None = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    throw: bool = eqx.field(static=True)
    matmul_precision: str | None = eqx.field(static=True)

    def __init__(
        self,
        solver: diffrax.AbstractSolver | None = None,
        controller: diffrax.AbstractStepSizeController | None = None,
        adjoint: diffrax.AbstractAdjoint | None = None,
        *,
        dt0: float | None = None,
        max_steps: int = 4096,
        throw: bool = True,
        matmul_precision: str | None = "highest",
    ):
        solver = ExpRK3() if solver is None else solver
        if not isinstance(solver, AbstractExponentialRK):
            raise ValueError(
                "solver must be an exponential Runge–Kutta method (pdeformer.ExpRK3() or "
                f"pdeformer.ExpRK2()); got {solver!r}. For an explicit diffrax solver use "
                "pdeformer.Continuous."
            )
        # The configuration shared with Continuous is checked by Continuous itself.
        checked = Continuous(
            controller=controller,
            adjoint=adjoint,
            dt0=dt0,
            max_steps=max_steps,
            throw=throw,
            matmul_precision=matmul_precision,
        )
        if not isinstance(checked.controller, diffrax.AbstractAdaptiveStepSizeController):
            raise ValueError(
                "controller must be adaptive, e.g. diffrax.PIDController(rtol=1e-3, "
                f"atol=1e-5); got {controller!r}. The exponential path exists to let the "
                "tolerance, not the diffusion coefficient, set the step."
            )
        if isinstance(checked.adjoint, diffrax.BacksolveAdjoint):
            raise ValueError(
                "BacksolveAdjoint is not supported by the exponential path; pass "
                "diffrax.RecursiveCheckpointAdjoint() (the default) or diffrax.DirectAdjoint()."
            )
        self.solver = solver
        self.controller = checked.controller
        self.adjoint = checked.adjoint
        self.dt0 = checked.dt0
        self.max_steps = checked.max_steps
        self.throw = checked.throw
        self.matmul_precision = checked.matmul_precision

    def __call__(self, field, u0, mask=None, *, save_at=None):
        _check_state(u0, mask)
        ts_save = _check_save_at(save_at, field.t1)
        if field.diffusion is None:
            raise ValueError(
                "ExponentialContinuous integrates a field's diffusion term exactly, but this "
                "field has none; use pdeformer.Continuous, or build the field with "
                "diffusion=pdeformer.DiffusionOperator(dim, alpha_max=None)."
            )
        if getattr(field, "transitions", None) is not None:
            raise ValueError(
                "ExponentialContinuous does not support fields with maps between layers "
                "(diffusion_at='between_layers'); use pdeformer.Continuous."
            )
        dtype = u0.dtype
        smooth = eqx.tree_at(lambda f: f.diffusion, field, None, is_leaf=lambda x: x is None)
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(_Rate(smooth, self.matmul_precision)),
            DiffusionTerm(field.diffusion, u0, mask),
        )
        controller = _clip_controller(
            self.controller,
            jump_ts=field.jump_times(),
            step_ts=() if ts_save is None else tuple(ts_save.tolist()),
            dtype=dtype,
        )
        if ts_save is None:
            saveat = diffrax.SaveAt(t1=True)
        else:
            # t1 is saved last, so the final state is there whatever was asked.
            saveat = diffrax.SaveAt(ts=jnp.asarray(np.append(ts_save, field.t1), dtype))
        sol = diffrax.diffeqsolve(
            terms,
            self.solver,
            t0=0.0,
            t1=field.t1,
            dt0=field.discrete_step if self.dt0 is None else self.dt0,
            y0=u0,
            args=(mask, None),
            stepsize_controller=controller,
            adjoint=self.adjoint,
            saveat=saveat,
            max_steps=self.max_steps,
            throw=self.throw,
        )
        num_steps = jnp.asarray(sol.stats["num_steps"], jnp.int32)
        stats = DepthStats(
            num_steps=num_steps,
            num_accepted_steps=jnp.asarray(sol.stats["num_accepted_steps"], jnp.int32),
            num_rejected_steps=jnp.asarray(sol.stats["num_rejected_steps"], jnp.int32),
            nfe=self.solver.num_stages * num_steps,
            success=sol.result == diffrax.RESULTS.successful,
        )
        if ts_save is None:
            return DepthSolution(u=sol.ys[-1], ts=None, us=None, stats=stats)
        return DepthSolution(
            u=sol.ys[-1], ts=jnp.asarray(ts_save, dtype), us=sol.ys[:-1], stats=stats
        )
