"""Exponential Runge–Kutta methods for `du/dt = N(t, u) + L u`, with `L` diagonal in a
known orthogonal basis (`AbstractSpectralTerm`): generic diffrax solvers.

The linear part is integrated exactly through its eigenvalues (`exp(h L)` and the
`phi`-functions are scalars per mode), only `N` is approximated, and an embedded error
estimate drives diffrax's step-size controllers, so the step follows the tolerance and the
smoothness of `N`, not the stiffness of `L`.
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
from jaxtyping import Array


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
