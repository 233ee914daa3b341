"""The dual encoder for Retrieval, and training/evaluation on a dual-input task."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import pdeformer as pf
from helpers import max_abs_diff, prefix_mask
from pdeformer.training import TrainConfig, evaluate, train


def test_dual_classifier_is_the_shared_encoder_and_lra_head(getkey):
    model = pf.DualClassifier(20, 8, 2, 2, 2, key=getkey(), mlp_dim=12)
    t1 = jr.randint(getkey(), (3, 9), 0, 20)
    t2 = jr.randint(getkey(), (3, 6), 0, 20)  # a shorter second document: padded inside
    m1 = prefix_mask([9, 4, 7], 9)
    m2 = prefix_mask([6, 6, 2], 6)
    run = eqx.filter_jit(lambda f, *args: f(*args))  # one compile, not op by op
    logits, sol = run(model, t1, m1, t2, m2)
    assert logits.shape == (3, 2)
    assert sol.u.shape == (2, 3, 9, 8)  # both documents, stacked, one integration
    # Written out: each document through the same encoder on its own, then LRA's head.
    x1, _ = run(model.encoder, t1, m1)
    x2, _ = run(model.encoder, t2, m2)
    x = jnp.concatenate([x1, x2, x1 * x2, x1 - x2], axis=-1)
    h = jnp.maximum(x @ model.mlp_weight + model.mlp_bias, 0.0)
    assert max_abs_diff(logits, h @ model.head_weight + model.head_bias) <= 1e-5
    # Swapping the documents changes the logits (the head is not symmetric) ...
    swapped, _ = run(model, t2, m2, t1, m1)
    assert max_abs_diff(swapped, logits) > 1e-6
    with pytest.raises(TypeError):  # jaxtyping (in tests) or the model says so
        model(t1, m1, t2[:2], m2[:2])
    with pytest.raises(ValueError, match="num_classes"):
        pf.DualClassifier(20, 8, 2, 2, 1, key=getkey())


# Training and evaluation end to end; the default tier trains a single-input model in
# test_training.py and checks the dual model's forward pass above.
@pytest.mark.integration
def test_train_and_evaluate_a_dual_task(tmp_path):
    task = pf.data.load_task(
        "retrieval", num_train=32, num_val=16, num_test=16, max_length=32, min_length=16, seed=0
    )
    assert task.dual
    model = pf.DualClassifier(
        task.vocab_size,
        16,
        2,
        1,
        task.num_classes,
        key=jr.PRNGKey(0),
        diffusion_at=("after_embedding",),
    )
    config = TrainConfig(total_steps=3, batch_size=8, warmup_steps=1, checkpoint_every=0)
    trained, history = train(model, task, pf.Discrete(), config, out_dir=tmp_path)
    assert len(history) == 3
    assert all(np.isfinite(r["loss"]) for r in history)
    moved = jax.tree.leaves(trained.encoder.after_embedding)[0]
    assert max_abs_diff(moved, jax.tree.leaves(model.encoder.after_embedding)[0]) > 0
    ev = evaluate(
        trained, task.val, pf.Continuous(diffrax.Heun(), diffrax.PIDController(1e-2, 1e-3)), 8
    )
    assert ev.num_examples == 16 and ev.logits.shape == (16, 2)
    assert ev.success == 1.0 and ev.mean_nfe > 0


def test_weight_decay_applies_to_matrices_only(getkey):
    """Stacked per-layer vectors (biases, norm scales, diffusion coefficients) have two
    axes but are not matrices: no weight decay on them."""
    import equinox as eqx

    from pdeformer.training import decay_mask

    model = pf.Classifier(10, 8, 2, 3, 4, key=getkey(), diffusion_at=pf.INSERTION_POINTS)
    mask = decay_mask(eqx.filter(model, eqx.is_inexact_array))
    enc = mask.encoder
    decayed = [
        enc.embedding,
        enc.field.blocks.attention.qkv_weight,
        enc.field.blocks.reaction.w2,
        mask.head_weight,
    ]
    kept = [
        enc.field.blocks.attention.qkv_bias,
        enc.field.blocks.attention_norm.weight,
        enc.field.blocks.reaction.b1,
        enc.field.blocks.after_ffn.operator.theta,
        enc.field.blocks.after_ffn.operator.mix,
        enc.field.transitions.operator.theta,
        enc.after_embedding.operator.theta,
        enc.final_norm.weight,
        mask.head_bias,
    ]
    assert all(x is True for x in decayed)
    assert all(x is False for x in kept)
