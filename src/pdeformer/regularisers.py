"""Regularisers of the flow in depth, accumulated inside the solve that computes it.

A regulariser is an integral over depth of a quantity of the flow `du/dt = f(t, u)`:

- `KineticEnergy`: `int ||f(t, u)||^2 dt` (Finlay et al. 2020, RNODE);
- `JacobianFrobenius`: `int ||df/du||_F^2 dt`, estimated with one probe per solve
  (Hutchinson: `E ||eps^T df/du||^2 = ||df/du||_F^2` for `E eps eps^T = I`);
- `ErrorEstimate`: `sum_j ||err_j|| |h_j|` over the accepted steps of an adaptive solve,
  with `err_j` the solver's own local error estimate (Pal et al. 2021, ERNODE).

The first two are extra state of the ODE: the solve integrates `(u, integrals)` with the
augmented rate `(f, integrands)` (`AugmentedRate`), and the integrals are left out of
step-size control (`StateSeminorm`), so the solver takes the same steps with or without
them. The third is added by a wrapper around the solver (`ErrorEstimating`), on the steps
it accepts.

**Normalisation.** Every quantity is per valid token: for a state `(*batch, seq, dim)`
with `n` valid tokens in the whole batch (all tokens without a mask),

- kinetic energy: `sum over valid tokens of ||f_token||^2 / n`;
- Jacobian: `||df/du||_F^2 / n`, the Jacobian of the whole (batched) rate with respect to
  the whole state (block diagonal over the batch), its rows of pads left out;
- error estimate: `sqrt(sum over valid tokens of ||err_token||^2 / n)`, the RMS over valid
  tokens of each token's error norm, times `|h|`.

So a weight means the same at any batch size and sequence length (the norms are over the
model width, as is the rate).

This module knows nothing of `Field` or of the integrators: it works on any diffrax vector
field `(t, u, args) -> du/dt`.
"""

import abc
from collections.abc import Callable, Sequence
from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optimistix as optx
from jaxtyping import Array, ArrayLike, Bool, Float, PRNGKeyArray, PyTree, Scalar


def _check_weight(cls_name: str, weight) -> Float[Array, ""]:
    if isinstance(weight, jax.core.Tracer):
        return weight
    value = np.asarray(weight)
    if value.shape != () or not np.issubdtype(value.dtype, np.number):
        raise ValueError(f"{cls_name} weight must be a real scalar; got weight={weight!r}.")
    if not (np.isfinite(value) and value >= 0):
        raise ValueError(
            f"{cls_name} weight must be finite and >= 0; got weight={float(value)}. "
            f"Pass e.g. {cls_name}(0.01), or leave the regulariser out."
        )
    # An array, so that changing the weight does not recompile a jitted training step.
    return jnp.asarray(value, dtype=float)


def _safe_sqrt(x):
    # The gradient of sqrt at 0 is infinite; an error estimate of exactly 0 (a zero field)
    # must still give finite gradients.
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)


class AbstractRegulariser(eqx.Module):
    """An integral over depth of a quantity of the flow, `weight` times which is added to
    the training loss.

    `integrand` is the quantity at one evaluation of the rate (per valid token, see the
    module's docstring). `uses_probe` says whether it needs the probe's vector–Jacobian
    product (and so a `key` per solve).
    """

    weight: eqx.AbstractVar[Float[Array, ""]]
    uses_probe: eqx.AbstractClassVar[bool]

    @abc.abstractmethod
    def integrand(
        self,
        rate: Float[Array, "*batch seq dim"],
        probe_vjp: Float[Array, "*batch seq dim"] | None,
        count: Scalar,
    ) -> Scalar:
        """The integrand at one evaluation: `rate = f(t, u)`, `probe_vjp = eps^T df/du`
        (`None` unless `uses_probe`), `count` the number of valid tokens."""


class KineticEnergy(AbstractRegulariser):
    """`int ||f(t, u)||^2 dt` per valid token (Finlay et al. 2020).

    **Arguments:**

    - `weight`: its weight in the loss, `>= 0`.
    """

    weight: Float[Array, ""]
    uses_probe: ClassVar[bool] = False

    def __init__(self, weight: ArrayLike = 1.0):
        self.weight = _check_weight("KineticEnergy", weight)

    def integrand(self, rate, probe_vjp, count):
        return jnp.sum(jnp.square(rate)) / count


class JacobianFrobenius(AbstractRegulariser):
    """`int ||df/du||_F^2 dt` per valid token, by a Hutchinson estimate with one probe per
    solve (Finlay et al. 2020): `||eps^T df/du||^2` with `eps` drawn once from the solve's
    `key` and held fixed in depth, one vector–Jacobian product per evaluation of the rate
    (no dense Jacobian). The solve then needs a `key`.

    **Arguments:**

    - `weight`: its weight in the loss, `>= 0`.
    - `gaussian`: draw the probe from a standard normal instead of Rademacher (`+-1`,
      the default, whose estimate has the smaller variance).
    """

    weight: Float[Array, ""]
    gaussian: bool = eqx.field(static=True)
    uses_probe: ClassVar[bool] = True

    def __init__(self, weight: ArrayLike = 1.0, *, gaussian: bool = False):
        self.weight = _check_weight("JacobianFrobenius", weight)
        self.gaussian = bool(gaussian)

    def integrand(self, rate, probe_vjp, count):
        return jnp.sum(jnp.square(probe_vjp)) / count


class ErrorEstimate(AbstractRegulariser):
    """`sum_j ||err_j|| |h_j|` over the accepted steps of an adaptive solve, `err_j` the
    solver's local error estimate of the state (RMS over valid tokens of each token's error
    norm; Pal et al. 2021, ERNODE). It needs a solver with an error estimate and an
    adaptive step-size controller; the solve adds it through `ErrorEstimating`.

    **Arguments:**

    - `weight`: its weight in the loss, `>= 0`.
    """

    weight: Float[Array, ""]
    uses_probe: ClassVar[bool] = False

    def __init__(self, weight: ArrayLike = 1.0):
        self.weight = _check_weight("ErrorEstimate", weight)

    def integrand(self, rate, probe_vjp, count):
        # Not an integral of the rate: `ErrorEstimating` adds it on accepted steps.
        return jnp.zeros((), rate.dtype)


def check_regularisers(regularisers) -> tuple:
    """`regularisers` as a tuple, each checked to be an `AbstractRegulariser`, at most one
    of each type.

    **Raises:**

    `ValueError` otherwise.
    """
    if isinstance(regularisers, AbstractRegulariser) or not isinstance(regularisers, (tuple, list)):
        raise ValueError(
            "regularisers must be a tuple of regularisers, e.g. (KineticEnergy(0.01),); "
            f"got {regularisers!r}."
        )
    regularisers = tuple(regularisers)
    for r in regularisers:
        if not isinstance(r, AbstractRegulariser):
            raise ValueError(
                "each regulariser must be a KineticEnergy, JacobianFrobenius or "
                f"ErrorEstimate; got {r!r}."
            )
    types = [type(r).__name__ for r in regularisers]
    if len(set(types)) != len(types):
        raise ValueError(f"each regulariser may appear once; got {types}.")
    return regularisers


def token_count(
    u: Float[Array, "*batch seq dim"], mask: Bool[Array, "*batch seq"] | None
) -> Scalar:
    """The number of valid tokens of a (batched) state, in its dtype, at least 1."""
    if mask is None:
        return jnp.asarray(float(np.prod(u.shape[:-1])), u.dtype)
    return jnp.maximum(jnp.sum(mask).astype(u.dtype), jnp.ones((), u.dtype))


def draw_probe(
    regularisers: tuple,
    u0: Float[Array, "*batch seq dim"],
    mask: Bool[Array, "*batch seq"] | None,
    key: PRNGKeyArray | None,
) -> Float[Array, "*batch seq dim"] | None:
    """The Hutchinson probe of a solve, zero on pads, or `None` when no regulariser uses it.

    **Raises:**

    `ValueError` when a regulariser uses a probe and `key` is `None`.
    """
    users = [r for r in regularisers if r.uses_probe]
    if not users:
        return None
    if key is None:
        raise ValueError(
            f"{type(users[0]).__name__} draws a probe per solve: pass key=... to the solve "
            "(e.g. depth(field, u0, mask, key=key), or model(tokens, mask, depth=depth, "
            "key=key)); a new key each training step."
        )
    draw = jr.normal if users[0].gaussian else jr.rademacher
    probe = draw(key, u0.shape, u0.dtype)
    if mask is not None:
        probe = jnp.where(mask[..., None], probe, jnp.zeros_like(probe))
    return probe


def integrands(
    regularisers: tuple,
    rate_fn: Callable[[Float[Array, "*batch seq dim"]], Float[Array, "*batch seq dim"]],
    u: Float[Array, "*batch seq dim"],
    probe: Float[Array, "*batch seq dim"] | None,
    count: Scalar,
) -> tuple[Float[Array, "*batch seq dim"], tuple[Scalar, ...]]:
    """The rate `rate_fn(u)` and each regulariser's integrand there.

    With a probe, the rate and `probe^T d rate/du` come from one `jax.vjp`.
    """
    if probe is None:
        rate = rate_fn(u)
        probe_vjp = None
    else:
        rate, vjp = jax.vjp(rate_fn, u)
        (probe_vjp,) = vjp(probe.astype(rate.dtype))
    values = tuple(jnp.asarray(r.integrand(rate, probe_vjp, count), u.dtype) for r in regularisers)
    return rate, values


class AugmentedRate(eqx.Module):
    """A diffrax vector field on `(u, integrals)`: the rate of `u`, and each regulariser's
    integrand as the rate of its integral (zero for `ErrorEstimate`).

    A module, so that the wrapped vector field's weights stay leaves of the term (which
    `diffrax.BacksolveAdjoint` differentiates). Build it with `augment`.
    """

    vector_field: Callable
    regularisers: tuple
    probe: Float[Array, "*batch seq dim"] | None
    count: Scalar

    def __call__(self, t, y, args):
        u, _ = y
        return integrands(
            self.regularisers,
            lambda v: self.vector_field(t, v, args),
            u,
            self.probe,
            self.count,
        )

    def initial(self, u0: Float[Array, "*batch seq dim"]) -> tuple:
        """The initial augmented state `(u0, zeros)`."""
        return u0, tuple(jnp.zeros((), u0.dtype) for _ in self.regularisers)


def augment(
    vector_field: Callable,
    regularisers: Sequence[AbstractRegulariser],
    u0: Float[Array, "*batch seq dim"],
    mask: Bool[Array, "*batch seq"] | None = None,
    *,
    key: PRNGKeyArray | None = None,
) -> AugmentedRate:
    """The augmented vector field of one solve from `u0`.

    **Arguments:**

    - `vector_field`: `(t, u, args) -> du/dt` on the (batched) state, zero on pads.
    - `regularisers`: a tuple of regularisers, one integral each, in that order.
    - `u0`: the initial state (its shape and dtype, and the probe's).
    - `mask`: valid tokens (`True`), or `None`; sets the normalisation and zeroes the probe
      on pads.
    - `key`: draws the probe, needed iff a regulariser uses one (`JacobianFrobenius`).

    **Returns:**

    An `AugmentedRate`; its `initial(u0)` is the initial state of the solve.
    """
    regularisers = check_regularisers(regularisers)
    probe = draw_probe(regularisers, u0, mask, key)
    return AugmentedRate(vector_field, regularisers, probe, token_count(u0, mask))


class StateSeminorm(eqx.Module):
    """The error norm of an augmented solve: `norm` of the state `u` alone, so that the
    integrals (`y = (u, integrals)`) never change the steps the solver takes.

    **Arguments:**

    - `norm`: the norm of the state (default RMS, diffrax's default).
    """

    norm: Callable[[PyTree], Scalar] = eqx.field(static=True, default=optx.rms_norm)

    def __call__(self, y):
        return self.norm(y[0])


def with_state_seminorm(
    controller: diffrax.AbstractStepSizeController,
) -> diffrax.AbstractStepSizeController:
    """`controller` with its error norm restricted to the state (`StateSeminorm` of the
    norm it had), inside a `diffrax.ClipStepSizeController` too; other controllers
    (`ConstantStepSize`) are returned as they are.

    **Raises:**

    `ValueError` for an adaptive controller other than `PIDController` (it is not known
    where its norm is).
    """
    if isinstance(controller, diffrax.ClipStepSizeController):
        inner = with_state_seminorm(controller.controller)
        return eqx.tree_at(lambda c: c.controller, controller, inner)
    if isinstance(controller, diffrax.PIDController):
        return eqx.tree_at(lambda c: c.norm, controller, StateSeminorm(controller.norm))
    if isinstance(controller, diffrax.AbstractAdaptiveStepSizeController):
        raise ValueError(
            "regularisers need the integrals left out of the error norm, which is known "
            "for diffrax.PIDController (optionally in ClipStepSizeController); got "
            f"{type(controller).__name__}."
        )
    return controller


class ErrorEstimating(diffrax.AbstractWrappedSolver):
    """Wraps an adaptive solver of an augmented state `(u, integrals)`: on each step adds
    `||err_u|| |h|` to the `ErrorEstimate` integral, `err_u` the wrapped solver's error
    estimate of `u` (RMS over valid tokens of each token's error norm).

    The addition is part of the step's candidate `y1`, so it stays only if the controller
    accepts the step. The dense interpolation of that integral (`SaveAt(dense=True)`, a save
    between steps) does not include it; its value at the end of a solve does.

    **Arguments:**

    - `solver`: the wrapped solver (one with an error estimate, e.g. `Tsit5`).
    - `index`: the position of the `ErrorEstimate` integral in `integrals`.
    - `count`: the number of valid tokens (see `token_count`).
    """

    solver: diffrax.AbstractSolver
    index: int = eqx.field(static=True)
    count: Scalar

    @property
    def term_structure(self):
        return self.solver.term_structure

    @property
    def interpolation_cls(self):  # pyright: ignore
        return self.solver.interpolation_cls

    @property
    def term_compatible_contr_kwargs(self):
        return self.solver.term_compatible_contr_kwargs

    def order(self, terms):
        return self.solver.order(terms)

    def strong_order(self, terms):
        return self.solver.strong_order(terms)

    def error_order(self, terms):
        return self.solver.error_order(terms)

    def init(self, terms, t0, t1, y0, args):
        return self.solver.init(terms, t0, t1, y0, args)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        y1, y_error, dense_info, solver_state, result = self.solver.step(
            terms, t0, t1, y0, args, solver_state, made_jump
        )
        if y_error is None:
            raise ValueError(
                f"ErrorEstimate needs a solver with an error estimate; "
                f"{type(self.solver).__name__} has none. Pass e.g. diffrax.Tsit5()."
            )
        u1, integrals = y1
        u_error = y_error[0]
        size = _safe_sqrt(jnp.sum(jnp.square(u_error)) / self.count.astype(u_error.dtype))
        h = jnp.abs(jnp.asarray(t1 - t0, u_error.dtype))
        integrals = tuple(
            v + (size * h).astype(v.dtype) if i == self.index else v
            for i, v in enumerate(integrals)
        )
        return (u1, integrals), y_error, dense_info, solver_state, result

    def func(self, terms, t0, y0, args):
        return self.solver.func(terms, t0, y0, args)


def regularised_solver(
    solver: diffrax.AbstractSolver, regularisers: tuple, count: Scalar | None
) -> diffrax.AbstractSolver:
    """`solver` wrapped in `ErrorEstimating` when `regularisers` hold an `ErrorEstimate`
    (`count`: the solve's number of valid tokens), else `solver` itself."""
    for i, r in enumerate(regularisers):
        if isinstance(r, ErrorEstimate):
            return ErrorEstimating(solver, i, count)
    return solver


def penalty(regularisers: Sequence[AbstractRegulariser], integrals: tuple | None) -> Scalar:
    """`sum_i weight_i * integral_i`, the term a training loss adds; `0` without
    regularisers (`integrals=None`).

    **Arguments:**

    - `regularisers`: those of the solve.
    - `integrals`: the solve's integrals, in the same order (`DepthSolution.regularisation`).
    """
    if integrals is None or not regularisers:
        return jnp.zeros(())
    total = None
    for r, v in zip(regularisers, integrals, strict=True):
        term = r.weight.astype(v.dtype) * v
        total = term if total is None else total + term
    return total


def seminorm_backsolve(
    rtol: float = 1e-3, atol: float = 1e-5, **kwargs
) -> diffrax.BacksolveAdjoint:
    """`diffrax.BacksolveAdjoint` whose backward solve controls its error on the state and
    its adjoint only, not on the parameters' adjoint (Kidger et al. 2021, "Hey, that's not
    an ODE"; `diffrax.adjoint_rms_seminorm`).

    The paper's saving is against a norm that weighs the parameters' adjoint like the
    state. diffrax's default norm is instead the RMS over every component, which the many
    parameters dilute, so the seminorm is not always the cheaper one: on small fields
    (width 8, two layers, float64, rtol = atol = 1e-6; eight draws) it took from 0.67 to
    1.8 times the default's backward evaluations on a smooth field, with gradients 1.1 to
    22 times more accurate, and 1.4 to 4.4 times as many on a field with jumps, at equal
    accuracy; at rtol = 1e-3 both took the same steps. Measure it on the model at hand.

    `Continuous` hands the field's jump times to this backward controller, as to the
    forward one. The backward tolerances are this function's: diffrax uses them instead of
    the forward controller's.

    **Arguments:**

    - `rtol`, `atol`: the backward solve's tolerances (e.g. the forward's).
    - `**kwargs`: other `diffeqsolve` arguments of the backward solve (e.g. `solver`).

    **Returns:**

    A `diffrax.BacksolveAdjoint` to pass as `Continuous(adjoint=...)`.
    """
    controller = diffrax.PIDController(rtol=rtol, atol=atol, norm=diffrax.adjoint_rms_seminorm)
    return diffrax.BacksolveAdjoint(stepsize_controller=controller, **kwargs)
