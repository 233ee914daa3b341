"""The diffusion rate in its eigenbasis: `D Lap` is diagonal in the DCT-II basis.

With a large diffusion coefficient the Neumann Laplacian's top eigenvalue `-4 D` holds an
explicit adaptive solver to steps `h ~ 3.5 / (4 D)` whatever the tolerance. But `D Lap`
(per channel, multi-scale, Neumann, on the valid prefix of each sequence) is diagonal in the
DCT-II basis, with eigenvalues `-sum_s alpha_s 4 sin^2(pi k d_s / 2n)`: every function of it
(`exp(h D Lap)` and the `phi`-functions) is a scalar per mode and costs two transforms.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Scalar

from .._checks import check_state
from ..exprk import AbstractSpectralTerm
from .diffusion import DiffusionOperator


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
        check_state(u, mask)
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
