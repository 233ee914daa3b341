"""The field's weights under the names of a hand-written pre-LN encoder.

No imports, so that a benchmark can use it and still choose its JAX platform before JAX is
imported.
"""

from __future__ import annotations


def field_weights(field) -> dict:
    """The field's stacked block weights (leading axis: layer) as a plain dict:
    `ln1_w`, `ln1_b`, `qkv_w`, `qkv_b`, `out_w`, `out_b`, `ln2_w`, `ln2_b`, `w1`, `b1`,
    `w2`, `b2`, in pdeformer's layout (`x @ W + b`). Works on any pytree shaped like the
    field, e.g. its gradients."""
    b = field.blocks
    return {
        "ln1_w": b.attention_norm.weight,
        "ln1_b": b.attention_norm.bias,
        "qkv_w": b.attention.qkv_weight,
        "qkv_b": b.attention.qkv_bias,
        "out_w": b.attention.out_weight,
        "out_b": b.attention.out_bias,
        "ln2_w": b.reaction_norm.weight,
        "ln2_b": b.reaction_norm.bias,
        "w1": b.reaction.w1,
        "b1": b.reaction.b1,
        "w2": b.reaction.w2,
        "b2": b.reaction.b2,
    }
