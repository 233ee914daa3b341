"""Where a diffusion layer can sit in the encoder: the seven insertion points.

Stream points act on the residual stream itself; branch points act inside a block's
attention or FFN branch, before the residual add. Every point means the same in discrete
and continuous mode (see `docs/insertion_points.md`):

| name              | kind   | where (pre-LN block `u + A(N u)`, `u + R(N' u)`)                  |
|-------------------|--------|-------------------------------------------------------------------|
| `after_embedding` | stream | once, on the embedded tokens (token + position), before depth     |
| `before_norm`     | branch | attention branch input, before its norm: `A(N(D u))`              |
| `after_norm`      | branch | attention branch, between norm and attention: `A(D(N u))`         |
| `after_attention` | branch | attention branch output, before the add: `D(A(N u))`              |
| `after_ffn`       | branch | FFN branch output, before the add: `D(R(N' u))`                   |
| `between_layers`  | stream | the stream between consecutive layers, `u <- D(u)` at `t = 1..L-1` |
| `before_head`     | stream | once, on the final states, before the final norm and pooling      |
"""

from collections.abc import Callable, Sequence

import equinox as eqx

INSERTION_POINTS: tuple[str, ...] = (
    "after_embedding",
    "before_norm",
    "after_norm",
    "after_attention",
    "after_ffn",
    "between_layers",
    "before_head",
)
"""The seven insertion points, in the order a token meets them."""

FIELD_POINTS: tuple[str, ...] = (
    "before_norm",
    "after_norm",
    "after_attention",
    "after_ffn",
    "between_layers",
)
"""The points that live inside the field (one layer per depth node, or per layer boundary)."""

ENCODER_POINTS: tuple[str, ...] = ("after_embedding", "before_head")
"""The points the encoder applies once, outside the depth integration."""

DiffusionFactory = Callable[..., eqx.Module]
"""`factory(dim, *, key, dtype) -> layer` with `layer(u, mask) -> u` on one sequence."""


def check_points(points: Sequence[str] | str | None, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """Validate insertion point names; returns them in canonical order, without repeats."""
    if points is None:
        return ()
    if isinstance(points, str):
        points = (points,)
    points = tuple(points)
    unknown = [p for p in points if p not in INSERTION_POINTS]
    if unknown:
        raise ValueError(
            f"unknown diffusion insertion point(s) {unknown}; the seven points are "
            f"{list(INSERTION_POINTS)}."
        )
    misplaced = [p for p in points if p not in allowed]
    if misplaced:
        raise ValueError(
            f"insertion point(s) {misplaced} cannot be placed here (this object takes "
            f"{list(allowed)}); {list(ENCODER_POINTS)} are placed by the Encoder, the others "
            "by the Field (an Encoder passes them on)."
        )
    return tuple(p for p in INSERTION_POINTS if p in points)
