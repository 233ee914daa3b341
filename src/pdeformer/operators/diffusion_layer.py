"""The Adaptive PDE Diffusion Layer: explicit diffusion steps along the token axis.

Two layers, both acting on one sequence `(seq, dim)` with an optional prefix mask:

- `DiffusionLayer`: `num_steps` explicit Euler steps `u <- u + sum_s alpha_s Lap_{d_s} u` of a
  `DiffusionOperator` (constant coefficients per channel, one global budget
  `sum_s alpha_s < alpha_max < 1/2`).
- `AdaptiveDiffusionLayer`: the same stencil in conservative flux form with edge
  conductances that depend on the tokens they join.

## Why the adaptive layer is stable for every parameter value

Fold the valid prefix `u_0 .. u_{n-1}` out to its even, `2n`-periodic extension (the
reflection of `neumann_laplacian`). For dilation `d` every position `m` of the extension has
two edges, `(m, m + d)` and `(m - d, m)`; edge `e = (a, b)` carries the conductance

    k_e = alpha_max * softmax(mix)_s * sigmoid(((z_a + z_b) / 2) + b_s),   z = u @ W

per channel (`z` is linear, so this is `sigmoid(W^T (u_a + u_b) / 2 + b_s)`), which is
symmetric in its endpoints and invariant under the reflection. One step is

    u'_m = u_m + sum_s sum_{e at m} k_e (u_other - u_m).

On the extension this is a graph diffusion with symmetric conductances, so, with the
conductances frozen at `u`, `u' = (I - L) u` where `L` is a weighted graph Laplacian (symmetric,
positive semi-definite, rows summing to zero). Every position has two edges per scale, so its
total outflow is at most `2 sum_s alpha_s < 2 alpha_max < 1`. Hence, per channel and for every
value of `W`, `b`, `theta`, `mix`:

- `I - L` is symmetric with non-negative entries and unit row sums (doubly stochastic): the
  token mean is conserved, the step is a maximum principle (`min u <= u' <= max u`) and is
  non-expansive in every `l^p` norm, `l^2` included;
- Gershgorin gives `0 <= eig(L) <= 2 * max outflow < 4 alpha_max < 2`, so the `l^2` energy
  drops by at least a fixed fraction of the (conductance-weighted) Dirichlet energy:
  `||u||^2 - ||u'||^2 = u^T (2L - L^2) u >= (2 - 4 alpha_max) sum_e k_e ||u_b - u_a||^2`.

Since every sum over the extension is twice the sum over the valid tokens, all of this holds
on the valid tokens. The edges of the last valid token for `d = 1` are self-loops of the
reflection: zero flux, a Neumann boundary. With `W = 0` the conductances are constant along
the sequence and the layer is exactly `DiffusionLayer` with `theta = b`.

What does **not** hold for the adaptive layer is monotonicity of the unweighted Dirichlet
energy `sum_i ||u_{i+1} - u_i||^2`: with variable conductances it can grow, even for frozen
(linear) conductances of any size — e.g. `u = (0, 1, 2)` with `k_{1/2} = c`, `k_{3/2} = 0`
maps the differences `(1, 1)` to `(1 - 2c, 1 + c)`. (The continuous analogue: `u_t = (k u_x)_x`
dissipates `int k u_x^2`, not `int u_x^2`.) With constant coefficients (`DiffusionLayer`,
or `W = 0`) all dilated Laplacians share the DCT-II eigenbasis with the Dirichlet energy, and
it is non-increasing.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from .diffusion import DiffusionOperator, _reflect


def _check_steps(num_steps) -> int:
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(
            f"num_steps must be an int >= 1 (explicit Euler steps per call); got "
            f"num_steps={num_steps!r}. Pass e.g. num_steps=1."
        )
    return num_steps


def _check_dim(dim) -> int:
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ValueError(f"dim must be an int >= 1 (the number of channels); got dim={dim!r}.")
    return dim


def _check_budget(alpha_max) -> float:
    if alpha_max is None or not (0.0 < float(alpha_max) < 0.5):
        raise ValueError(
            f"alpha_max must lie in (0, 1/2): it bounds the total explicit-step coefficient, "
            f"and stability needs it below 1/2; got alpha_max={alpha_max!r}. Pass e.g. "
            "alpha_max=0.45 (for an unbounded D >= 0 in continuous depth use "
            "DiffusionOperator(dim, alpha_max=None) in the Field instead)."
        )
    return float(alpha_max)


class DiffusionLayer(eqx.Module):
    """`num_steps` explicit Euler steps of learnable multi-scale token diffusion.

    Each step is `u <- u + sum_s alpha_s * (u_{i+d_s} - 2 u_i + u_{i-d_s})` with Neumann
    (mirrored) ends at the last valid token, per channel, where
    `alpha_s = alpha_max * sigmoid(theta) * softmax(mix)_s`, so `sum_s alpha_s < alpha_max < 1/2`
    for every parameter value. All dilated Laplacians share the DCT-II eigenbasis, with
    eigenvalues in `[-4, 0]`, so one step multiplies each mode by a factor in `(-1, 1]`: the
    step is non-expansive, conserves the token mean and never increases the Dirichlet
    energy. Pads are untouched and never read. Cost: `O(seq * dim)` per scale and step.

    **Arguments:**

    - `dim`: number of channels.
    - `dilations`: the stencil reaches, `(1,)` (default) or e.g. `(1, 2, 4, 8)`.
    - `num_steps`: explicit steps per call, `>= 1`.
    - `alpha_max`: the global budget, in `(0, 1/2)`.
    - `init`: initial total coefficient per channel, in `(0, alpha_max)`.
    - `key`: unused (the initialisation is deterministic); accepted so that every
      diffusion layer can be built as `layer(dim, key=..., dtype=...)`.
    - `dtype`: parameter dtype.
    """

    operator: DiffusionOperator
    num_steps: int = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        *,
        dilations: tuple[int, ...] = (1,),
        num_steps: int = 1,
        alpha_max: float = 0.45,
        init: float = 0.1,
        key: PRNGKeyArray | None = None,
        dtype=jnp.float32,
    ):
        del key
        dim = _check_dim(dim)
        self.num_steps = _check_steps(num_steps)
        alpha_max = _check_budget(alpha_max)
        self.operator = DiffusionOperator(
            dim, dilations=dilations, alpha_max=alpha_max, init=init, dtype=dtype
        )

    @property
    def dilations(self) -> tuple[int, ...]:
        return self.operator.dilations

    @property
    def alpha_max(self) -> float:
        return self.operator.alpha_max

    def coefficients(self) -> Float[Array, "scales dim"]:
        """Per-scale, per-channel coefficients `alpha_s >= 0`, summing to `< alpha_max`."""
        return self.operator.coefficients()

    def __call__(
        self, u: Float[Array, "seq dim"], mask: Bool[Array, " seq"] | None = None
    ) -> Float[Array, "seq dim"]:
        """Diffuse one sequence.

        **Arguments:**

        - `u`: token states of one sequence.
        - `mask`: `True` on valid tokens, valid tokens first, or `None` for all valid.

        **Returns:**

        The diffused states, same shape as `u`; pads are returned unchanged.
        """
        for _ in range(self.num_steps):
            # The operator's rate is zero on pads and reads only valid tokens.
            u = u + self.operator(u, mask)
        return u


class AdaptiveDiffusionLayer(eqx.Module):
    """Token-adaptive diffusion in conservative flux form, stable for every parameter value.

    One step, per channel and scale `s` with dilation `d`:

        u_i <- u_i + sum_s [ k_{i+d/2} (u_{i+d} - u_i) - k_{i-d/2} (u_i - u_{i-d}) ]

    with edge conductances `k = alpha_max * softmax(mix)_s * sigmoid(W^T (u_a + u_b) / 2 + b_s)`
    between the two tokens `a`, `b` an edge joins (neighbours beyond the last valid token
    are mirrored, as in `neumann_laplacian`). Each conductance is below `alpha_s^max =
    alpha_max * softmax(mix)_s`, these sum to `alpha_max < 1/2`, and each token has two
    edges per scale, so its total outflow stays below 1. The step is then, for frozen
    conductances, a symmetric doubly-stochastic matrix: it conserves the token mean, obeys a
    maximum principle, is non-expansive, and dissipates `l^2` energy by at least
    `(2 - 4 alpha_max) sum_e k_e ||u_b - u_a||^2` (see the module docstring for the proof, and
    for why the *unweighted* Dirichlet energy is not monotone under variable conductances).
    With `W = 0` it is exactly `DiffusionLayer` with `theta = b`.

    Cost: one `(seq, dim) @ (dim, dim)` matmul for the gate logits (shared by all scales, as
    the logit is linear in the midpoint), then `O(seq * dim)` per scale and step.

    **Arguments:**

    - `dim`: number of channels.
    - `dilations`: the stencil reaches, `(1,)` (default) or e.g. `(1, 2, 4, 8)`.
    - `num_steps`: explicit steps per call, `>= 1`.
    - `alpha_max`: the global budget, in `(0, 1/2)`.
    - `init`: initial conductance per channel at `W = 0`, in `(0, alpha_max)`.
    - `key`: a PRNG key for a small random `W` (`init_scale / sqrt(dim)` normal entries);
      `None` (default) starts from `W = 0`, i.e. from `DiffusionLayer`.
    - `init_scale`: scale of the random `W`.
    - `dtype`: parameter dtype.
    """

    gate_weight: Float[Array, "dim dim"]
    gate_bias: Float[Array, "scales dim"]
    mix: Float[Array, "scales dim"]
    dilations: tuple[int, ...] = eqx.field(static=True)
    num_steps: int = eqx.field(static=True)
    alpha_max: float = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        *,
        dilations: tuple[int, ...] = (1,),
        num_steps: int = 1,
        alpha_max: float = 0.45,
        init: float = 0.1,
        key: PRNGKeyArray | None = None,
        init_scale: float = 0.1,
        dtype=jnp.float32,
    ):
        dim = _check_dim(dim)
        self.num_steps = _check_steps(num_steps)
        alpha_max = _check_budget(alpha_max)
        # DiffusionOperator validates dilations and init and gives the inverse-sigmoid bias.
        op = DiffusionOperator(
            dim, dilations=dilations, alpha_max=alpha_max, init=init, dtype=dtype
        )
        self.dilations = op.dilations
        self.alpha_max = alpha_max
        self.gate_bias = jnp.broadcast_to(op.theta, (len(op.dilations), dim)).astype(dtype)
        self.mix = op.mix
        if key is None:
            self.gate_weight = jnp.zeros((dim, dim), dtype)
        else:
            self.gate_weight = (init_scale / dim**0.5) * jr.normal(key, (dim, dim), dtype)

    def max_conductances(self) -> Float[Array, "scales dim"]:
        """The per-scale bound `alpha_s^max` on every edge conductance (sum `= alpha_max`)."""
        return self.alpha_max * jax.nn.softmax(self.mix, axis=0)

    def _neighbours(self, seq: int, mask: Bool[Array, " seq"] | None, d: int):
        i = jnp.arange(seq)
        n = jnp.asarray(seq) if mask is None else jnp.maximum(jnp.sum(mask.astype(jnp.int32)), 1)
        return _reflect(i + d, n), _reflect(i - d, n)

    def conductances(
        self, u: Float[Array, "seq dim"], mask: Bool[Array, " seq"] | None = None
    ) -> tuple[Float[Array, "scales seq dim"], Float[Array, "scales seq dim"]]:
        """Conductances of each token's upper (`i, i+d`) and lower (`i-d, i`) edge per scale.

        Neighbours past the valid prefix are mirrored; rows of pads are meaningless.
        """
        seq = u.shape[0]
        z = u @ self.gate_weight
        amax = self.max_conductances()
        ups, downs = [], []
        for s, d in enumerate(self.dilations):
            up, down = self._neighbours(seq, mask, d)
            # z_i + z_j is commutative in IEEE arithmetic, so both ends of an edge compute
            # bit-identical conductances: the flux is exactly antisymmetric.
            k_up = amax[s] * jax.nn.sigmoid((z + z[up]) / 2 + self.gate_bias[s])
            k_down = amax[s] * jax.nn.sigmoid((z + z[down]) / 2 + self.gate_bias[s])
            ups.append(k_up)
            downs.append(k_down)
        return jnp.stack(ups), jnp.stack(downs)

    def step(
        self, u: Float[Array, "seq dim"], mask: Bool[Array, " seq"] | None = None
    ) -> Float[Array, "seq dim"]:
        """The increment of one explicit step (zero on pads)."""
        seq = u.shape[0]
        k_up, k_down = self.conductances(u, mask)
        out = jnp.zeros_like(u)
        for s, d in enumerate(self.dilations):
            up, down = self._neighbours(seq, mask, d)
            out = out + k_up[s] * (u[up] - u) - k_down[s] * (u - u[down])
        if mask is not None:
            out = jnp.where(mask[:, None], out, jnp.zeros_like(out))
        return out

    def __call__(
        self, u: Float[Array, "seq dim"], mask: Bool[Array, " seq"] | None = None
    ) -> Float[Array, "seq dim"]:
        """Diffuse one sequence.

        **Arguments:**

        - `u`: token states of one sequence.
        - `mask`: `True` on valid tokens, valid tokens first, or `None` for all valid.

        **Returns:**

        The diffused states, same shape as `u`; pads are returned unchanged.
        """
        for _ in range(self.num_steps):
            u = u + self.step(u, mask)
        return u
