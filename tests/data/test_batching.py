import numpy as np
import pytest

from pdeformer.data import (
    Split,
    batch_order,
    iterate_batches,
    iterate_forever,
    load_split,
    pad_sequences,
    save_split,
)


def _split(n=50, dual=False):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 20, size=rng.integers(1, 30)) for _ in range(n)]
    tokens, lengths = pad_sequences(seqs)
    labels = np.arange(n, dtype=np.int32) % 3
    if dual:
        t2, l2 = pad_sequences([s[::-1][:5] for s in seqs])
        return Split(tokens, lengths, labels, t2, l2)
    return Split(tokens, lengths, labels)


def test_pad_sequences_compact_dtypes():
    t, lens = pad_sequences([np.array([1, 2, 3]), np.array([4])])
    assert t.dtype == np.uint8 and lens.dtype == np.int32
    np.testing.assert_array_equal(t, [[1, 2, 3], [4, 0, 0]])
    t, _ = pad_sequences([b"\xff\x00"], offset=1)
    assert t.dtype == np.uint16 and t.tolist() == [[256, 1]]
    t, lens = pad_sequences([np.arange(1, 10)], max_length=4)
    assert t.shape == (1, 4) and lens[0] == 4


def test_split_validation():
    with pytest.raises(ValueError, match="uint8 or uint16"):
        Split(np.zeros((2, 3), np.float32), np.zeros(2, np.int32), np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="lengths must lie"):
        Split(np.zeros((2, 3), np.uint8), np.full(2, 4, np.int32), np.zeros(2, np.int32))


def test_masks_and_padding():
    split = _split()
    for batch in iterate_batches(split, 8, seed=1):
        assert batch.tokens.dtype == np.int32 and batch.mask.dtype == bool
        assert batch.tokens.shape[1] == batch.mask.sum(1).max()
        assert np.all(batch.tokens[~batch.mask] == 0)
        assert np.all(batch.tokens[batch.mask] > 0)
        assert batch.tokens2 is None
    fixed = next(iterate_batches(split, 8, pad_to=40))
    assert fixed.tokens.shape == (8, 40)
    mult = next(iterate_batches(split, 8, pad_multiple=16))
    assert mult.tokens.shape[1] % 16 == 0
    with pytest.raises(ValueError, match="pad_to"):
        next(iterate_batches(split, 8, pad_to=2))


def test_deterministic_shuffle_and_epochs():
    split = _split()
    a = [b.labels for b in iterate_batches(split, 8, seed=3, epoch=2)]
    b = [b.labels for b in iterate_batches(split, 8, seed=3, epoch=2)]
    c = [b.labels for b in iterate_batches(split, 8, seed=3, epoch=1)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    order = np.concatenate(batch_order(split.lengths, 8, seed=3, drop_remainder=False))
    assert sorted(order.tolist()) == list(range(len(split)))
    plain = np.concatenate(batch_order(split.lengths, 8, shuffle=False, drop_remainder=False))
    np.testing.assert_array_equal(plain, np.arange(len(split)))


def test_resume_from_start_step_and_global_step():
    split = _split()
    full = list(iterate_batches(split, 8, seed=5, epoch=0))
    resumed = list(iterate_batches(split, 8, seed=5, epoch=0, start_step=3))
    assert len(resumed) == len(full) - 3
    for x, y in zip(full[3:], resumed, strict=True):
        np.testing.assert_array_equal(x.tokens, y.tokens)
    stream = iterate_forever(split, 8, seed=5)
    first = [next(stream) for _ in range(15)]
    again = iterate_forever(split, 8, seed=5, start_step=9)
    for step, batch in [next(again) for _ in range(6)]:
        np.testing.assert_array_equal(batch.tokens, first[step][1].tokens)
        assert step == first[step][0]


def test_bucketing_reduces_padding_and_covers_all():
    split = _split(200)
    plain = list(iterate_batches(split, 10, seed=0))
    bucketed = list(iterate_batches(split, 10, seed=0, bucket_batches=5))
    assert sum(b.tokens.size for b in bucketed) < sum(b.tokens.size for b in plain)
    order = np.concatenate(batch_order(split.lengths, 10, seed=0, bucket_batches=5))
    assert sorted(order.tolist()) == list(range(200))


def test_dual_batches_and_cache_roundtrip(tmp_path):
    split = _split(dual=True)
    batch = next(iterate_batches(split, 4))
    assert batch.tokens2 is not None and batch.mask2 is not None
    assert batch.mask2.sum(1).max() == batch.tokens2.shape[1]
    save_split(tmp_path / "s.npz", split)
    back = load_split(tmp_path / "s.npz")
    assert back.dual and back.tokens.dtype == np.uint8
    np.testing.assert_array_equal(back.tokens2, split.tokens2)
    with pytest.raises(FileNotFoundError, match="save_split"):
        load_split(tmp_path / "missing.npz")
