"""`Unrolled`: an explicit Runge–Kutta method with its stages unrolled at trace time.

diffrax evaluates the stages of a Runge–Kutta step in a checkpointed loop (one code path
for explicit, implicit and multi-tableau methods, and one trace of the vector field). In
reverse mode that loop stores each stage's input and recomputes the stage when its
gradient is needed. Under `Continuous`'s default adjoint, which already recomputes each
step from its checkpoint, every stage is then evaluated at least twice in the backward
pass.

`Unrolled(solver)` runs the same tableau as straight-line code: `k_i = f(t_i,
y0 + sum_j a_ij k_j)` with diffrax's stage times (`t1` itself where `c_i = 1`, so that a
step clipped just before a jump never evaluates the field at the jump), the solution and
the error estimate as the tableau's weighted sums, the same dense output and
first-same-as-last reuse. Reverse mode then keeps every stage's intermediates for the step
being differentiated and evaluates each stage once less. The method and its step-size
decisions are the solver's own. What differs: the order of floating-point additions, and
terms with a zero coefficient are left out of the sums (diffrax multiplies them by zero,
so a non-finite stage of zero weight gives it a NaN and a rejected step; here it is
ignored).

The trade: the vector field is traced once per stage (compiling takes longer), and while a
step is differentiated the intermediates of all its stages are alive at once.
"""

from __future__ import annotations

import diffrax
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu


def can_unroll(solver) -> bool:
    """Whether `Unrolled(solver)` accepts `solver`: an explicit Runge–Kutta method with one
    Butcher tableau, not already `Unrolled`."""
    tableau = getattr(solver, "tableau", None)
    return (
        isinstance(solver, diffrax.AbstractERK)
        and isinstance(tableau, diffrax.ButcherTableau)
        and not tableau.implicit
    )


def _check_solver(solver) -> diffrax.AbstractERK:
    tableau = getattr(solver, "tableau", None)
    if isinstance(solver, Unrolled):
        raise ValueError("solver is already Unrolled; pass the diffrax solver itself.")
    if not (
        isinstance(solver, diffrax.AbstractERK)
        and isinstance(tableau, diffrax.ButcherTableau)
        and not tableau.implicit
    ):
        raise ValueError(
            "Unrolled needs an explicit Runge-Kutta solver with one Butcher tableau (Heun, "
            "Midpoint, Ralston, Bosh3, Tsit5, Dopri5, Dopri8); got "
            f"{type(solver).__name__}."
        )
    return solver


def _combine(coefficients, ks: list):
    """`sum_j coefficients[j] * ks[j]` over the nonzero coefficients (pytrees of arrays)."""
    pairs = [(float(c), k) for c, k in zip(coefficients, ks, strict=True) if c != 0]

    def leaf(*xs):
        return sum(jnp.asarray(c, x.dtype) * x for (c, _), x in zip(pairs, xs, strict=True))

    return jtu.tree_map(leaf, *[k for _, k in pairs])


class Unrolled(diffrax.AbstractAdaptiveSolver):
    """An explicit Runge–Kutta solver whose stages are unrolled: the same method, with a
    cheaper reverse pass.

    **Arguments:**

    - `solver`: an explicit diffrax Runge–Kutta solver with a single Butcher tableau, e.g.
      `diffrax.Tsit5()` or `diffrax.Dopri5()` (not `Euler`, which has one stage and
      nothing to unroll, nor implicit or multi-tableau solvers).

    Use it for ODEs, e.g. `Continuous(Unrolled(diffrax.Dopri5()), ...)`. The solution,
    the error estimate, the dense output and the steps taken are those of `solver`, up to
    the order of floating-point additions (see the module docstring). Terms whose vector
    field diffrax marks expensive (`AbstractTerm.is_vf_expensive`, e.g. some adjoint
    terms) are stepped by `solver` itself, as diffrax would. What changes is how reverse
    mode differentiates a step: diffrax evaluates the stages in a checkpointed loop that
    recomputes each stage in the backward pass; here the stages are straight-line code, so
    each is evaluated once less per differentiated step (see the module docstring and
    `docs/architecture.md` for the measured effect). The costs: the vector field is traced
    once per stage, so compilation takes longer, and the intermediates of all stages of the
    step being differentiated are held at once.
    """

    solver: diffrax.AbstractERK
    term_structure = diffrax.AbstractTerm

    def __init__(self, solver):
        self.solver = _check_solver(solver)

    @property
    def interpolation_cls(self):  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.solver.interpolation_cls

    @property
    def tableau(self) -> diffrax.ButcherTableau:
        """The wrapped solver's Butcher tableau."""
        return self.solver.tableau

    def order(self, terms):
        return self.solver.order(terms)

    def error_order(self, terms):
        return self.solver.error_order(terms)

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)

    def init(self, terms, t0, t1, y0, args):
        # The wrapped solver's state: `(first step, the previous step's last stage)` for an
        # FSAL tableau (unless the vector field is expensive), else `None`.
        return self.solver.init(terms, t0, t1, y0, args)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        if terms.is_vf_expensive(t0, t1, y0, args):
            # diffrax then uses vector-field-control products and no FSAL: its own step.
            return self.solver.step(terms, t0, t1, y0, args, solver_state, made_jump)
        tableau = self.tableau
        control = terms.contr(t0, t1)
        dt = t1 - t0

        def time(c):
            # As diffrax: exactly `t1` for `c = 1` (`t0 + dt` may round onto a jump).
            return t1 if float(c) == 1.0 else t0 + float(c) * dt

        if tableau.fsal:
            first_step, f_last = solver_state
            # The last stage of the previous step is `f(t0, y0)`, except on the first step
            # and after a jump of the vector field.
            fresh = eqxi.unvmap_any(first_step | made_jump)
            f0 = jax.lax.cond(fresh, lambda: terms.vf(t0, y0, args), lambda: f_last)
        else:
            f0 = terms.vf(time(tableau.c1), y0, args)
        f = f0
        ks = [terms.prod(f0, control)]
        y_stage = y0
        for c, a in zip(tableau.c, tableau.a_lower, strict=True):
            y_stage = jtu.tree_map(jnp.add, y0, _combine(a, ks))
            f = terms.vf(time(c), y_stage, args)
            ks.append(terms.prod(f, control))
        if tableau.ssal:  # the last stage is evaluated at the solution itself
            y1 = y_stage
        else:
            y1 = jtu.tree_map(jnp.add, y0, _combine(tableau.b_sol, ks))
        y_error = _combine(tableau.b_error, ks)
        dense_info = dict(y0=y0, y1=y1, k=jtu.tree_map(lambda *x: jnp.stack(x), *ks))
        state = (False, f) if tableau.fsal else None  # as diffrax returns it
        return y1, y_error, dense_info, state, diffrax.RESULTS.successful
