"""Diffusion along the token axis: the Neumann Laplacian and its learnable coefficients."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


def _reflect(j: Int[Array, " seq"], n: Int[Array, ""]) -> Int[Array, " seq"]:
    # Even, 2n-periodic extension of the valid tokens (cell-centred Neumann boundary,
    # "mirror the edge token"). With this extension every dilated Laplacian is a circulant
    # on the extended sequence, so all scales share the DCT-II eigenbasis and commute:
    # that is what makes the multi-scale budget argument exact.
    r = jnp.mod(j, 2 * n)
    return jnp.where(r >= n, 2 * n - 1 - r, r)


def neumann_laplacian(
    u: Float[Array, "seq dim"], mask: Bool[Array, " seq"] | None = None, dilation: int = 1
) -> Float[Array, "seq dim"]:
    """Dilated 3-point Laplacian `u[i+d] - 2 u[i] + u[i-d]` with Neumann (mirrored) ends.

    Only valid tokens take part: the last valid token is the boundary, pads are never
    read, and the result is zero on pads.

    **Arguments:**

    - `u`: token states of one sequence.
    - `mask`: key-padding mask, `True` on valid tokens; valid tokens must come first
      (a prefix mask, as every reader and batcher of this library produces).
    - `dilation`: the stencil's reach `d >= 1`.

    **Returns:**

    The Laplacian, same shape as `u`.
    """
    seq = u.shape[0]
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1; got {dilation}.")
    i = jnp.arange(seq)
    if mask is None:
        n = jnp.asarray(seq)
        if dilation == 1:
            # Fast path: shifts instead of gathers.
            up = jnp.concatenate([u[1:], u[-1:]], axis=0)
            down = jnp.concatenate([u[:1], u[:-1]], axis=0)
            return up - 2 * u + down
    else:
        n = jnp.maximum(jnp.sum(mask.astype(jnp.int32)), 1)
    up = jnp.take(u, _reflect(i + dilation, n), axis=0)
    down = jnp.take(u, _reflect(i - dilation, n), axis=0)
    lap = up - 2 * u + down
    if mask is not None:
        lap = jnp.where(mask[:, None], lap, jnp.zeros_like(lap))
    return lap


class DiffusionOperator(eqx.Module):
    """Learnable multi-scale diffusion rate `sum_s alpha_s * Laplacian_{d_s}(u)`, per channel.

    The coefficients are `alpha_s = a * softmax(mix)_s` per channel, with the total
    `a = alpha_max * sigmoid(theta)` when `alpha_max` is given (so `0 <= sum_s alpha_s <
    alpha_max < 1/2` for every parameter value: one explicit Euler step `u + rate` is then
    non-expansive, mean-conserving and Dirichlet-energy dissipating), or
    `a = softplus(theta)` when `alpha_max=None` (the unbounded `D >= 0` of the
    continuous-depth diffusion term).

    **Arguments:**

    - `dim`: number of channels.
    - `dilations`: the stencil reaches, e.g. `(1,)` or `(1, 2, 4, 8)` for multi-scale.
    - `alpha_max`: the stability budget, in `(0, 1/2)`, or `None` for an unbounded
      non-negative coefficient.
    - `init`: initial total coefficient per channel (must be below `alpha_max`).
    """

    theta: Float[Array, " dim"]
    mix: Float[Array, "scales dim"]
    dilations: tuple[int, ...] = eqx.field(static=True)
    alpha_max: float | None = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        *,
        dilations: tuple[int, ...] = (1,),
        alpha_max: float | None = 0.45,
        init: float = 0.1,
        dtype=jnp.float32,
    ):
        dilations = tuple(int(d) for d in dilations)
        if len(dilations) == 0 or any(d < 1 for d in dilations):
            raise ValueError(
                f"dilations must be a non-empty tuple of integers >= 1; got {dilations}. "
                "Pass e.g. (1,) or (1, 2, 4, 8)."
            )
        if alpha_max is not None and not (0.0 < alpha_max < 0.5):
            raise ValueError(
                f"alpha_max must lie in (0, 1/2) for a stable explicit step; got "
                f"alpha_max={alpha_max}. Pass e.g. alpha_max=0.45, or alpha_max=None for an "
                "unbounded D >= 0 in continuous depth."
            )
        if alpha_max is not None and not (0.0 < init < alpha_max):
            raise ValueError(f"init must lie in (0, alpha_max={alpha_max}); got init={init}.")
        if alpha_max is None and not (0 < init < math.inf):
            raise ValueError(f"init must be > 0 and finite; got init={init}.")
        if alpha_max is None:
            # The inverse softplus log(exp(x) - 1), written as x + log(1 - exp(-x)): exp(x)
            # overflows a float from x = 710 on, exp(-x) never does.
            theta0 = init + math.log(-math.expm1(-init))
        else:
            p = init / alpha_max
            theta0 = math.log(p / (1 - p))  # inverse sigmoid
        self.theta = jnp.full((dim,), theta0, dtype)
        self.mix = jnp.zeros((len(dilations), dim), dtype)
        self.dilations = dilations
        self.alpha_max = alpha_max

    def total(self) -> Float[Array, " dim"]:
        """The total coefficient `sum_s alpha_s` per channel."""
        if self.alpha_max is None:
            return jax.nn.softplus(self.theta)
        return self.alpha_max * jax.nn.sigmoid(self.theta)

    def coefficients(self) -> Float[Array, "scales dim"]:
        """The per-scale, per-channel coefficients `alpha_s >= 0`."""
        return self.total()[None, :] * jax.nn.softmax(self.mix, axis=0)

    def __call__(
        self, u: Float[Array, "seq dim"], mask: Bool[Array, " seq"] | None = None
    ) -> Float[Array, "seq dim"]:
        alphas = self.coefficients()
        out = jnp.zeros_like(u)
        for s, d in enumerate(self.dilations):
            out = out + alphas[s] * neumann_laplacian(u, mask, d)
        return out
