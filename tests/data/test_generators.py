import contextlib
import dataclasses
import itertools
import re
import signal

import numpy as np
import pytest

from pdeformer.data import (
    TASK_NAMES,
    ListOpsConfig,
    PathfinderConfig,
    SyntheticRetrievalConfig,
    SyntheticTextConfig,
    generate_listops,
    generate_pathfinder,
    generate_retrieval,
    generate_text,
    listops,
    listops_to_source,
    load_task,
)

# ---------------------------------------------------------------- independent ListOps evaluator


def _parse_source(source):
    """Recursive-descent parser of LRA's parenthesised Source into nested (left, right) pairs."""
    toks = source.split()
    pos = 0

    def node():
        nonlocal pos
        tok = toks[pos]
        pos += 1
        if tok != "(":
            return tok
        left = node()
        right = node()
        assert toks[pos] == ")", f"expected ')' at {pos}"
        pos += 1
        return (left, right)

    tree = node()
    assert pos == len(toks)
    return tree


def _flatten(pair):
    left, right = pair
    if isinstance(left, str):
        return [left, right]
    return _flatten(left) + [right]


def _value(tree):
    if isinstance(tree, str):
        return int(tree)
    items = _flatten(tree)
    op, args, close = items[0], [_value(x) for x in items[1:-1]], items[-1]
    assert close == "]" and len(args) >= 2
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[MED":
        return int(np.median(args))
    assert op == "[SM"
    return sum(args) % 10


def test_source_rendering_matches_lra_example():
    # [MAX 2 9 [MIN 4 7 ] 0 ] with the fixed vocabulary (ops 1-4, ']' 5, digits 6-15).
    toks = np.array([2, 8, 15, 1, 10, 13, 5, 6, 5])
    src = listops_to_source(toks)
    assert src == "( ( ( ( ( [MAX 2 ) 9 ) ( ( ( [MIN 4 ) 7 ) ] ) ) 0 ) ] )"
    assert _value(_parse_source(src)) == 9


def test_listops_labels_match_independent_evaluator():
    cfg = ListOpsConfig(min_length=20, max_length=200)
    split = generate_listops(300, cfg, seed=1)
    for row, n, y in zip(split.tokens, split.lengths, split.labels, strict=True):
        assert 20 < n < 200
        assert _value(_parse_source(listops_to_source(row[:n]))) == y
    assert np.all(
        split.tokens[np.arange(split.tokens.shape[1])[None] >= split.lengths[:, None]] == 0
    )


def test_listops_real_bounds_label_skew_and_depth():
    # LRA's bounds: 500 < len < 2000. Known skew: labels 0 and 9 ~17% each, 1-8 ~8% each.
    split = generate_listops(1200, ListOpsConfig(), seed=0)
    assert split.lengths.min() > 500 and split.lengths.max() < 2000
    frac = np.bincount(split.labels, minlength=10) / len(split)
    # 1200 draws: sd of a 17% share is ~1.1 points, so +-4.5 points is > 4 sd.
    assert 0.125 < frac[0] < 0.215 and 0.125 < frac[9] < 0.215
    assert np.all(frac[1:9] < 0.125)
    for row, n, y in list(zip(split.tokens, split.lengths, split.labels, strict=True))[:40]:
        assert _value(_parse_source(listops_to_source(row[:n]))) == y


def test_listops_reproducible_and_unique():
    cfg = ListOpsConfig(min_length=20, max_length=100)
    a = generate_listops(200, cfg, seed=7)
    b = generate_listops(200, cfg, seed=7)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    rows = {a.tokens[i, : a.lengths[i]].tobytes() for i in range(len(a))}
    assert len(rows) == len(a)
    task = load_task(
        "listops", num_train=100, num_val=30, num_test=30, min_length=20, max_length=100, seed=3
    )
    tr = {r.tobytes() for r in task.train.tokens[:, :99]}
    assert not tr & {r.tobytes() for r in task.test.tokens[:, :99]}
    assert task.vocab_size == 16 and task.num_classes == 10 and task.train.tokens.dtype == np.uint8


def test_listops_config_validation():
    with pytest.raises(ValueError, match="min_length"):
        ListOpsConfig(min_length=100, max_length=100)


@contextlib.contextmanager
def _deadline(seconds):
    # A generator that draws forever fails the test instead of hanging the suite.
    def fail(*_):
        raise TimeoutError(f"still drawing after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_listops_refuses_lengths_no_tree_reaches():
    # max_depth=1 leaves one digit, 1 token: no tree has 5 < length < 50.
    with (
        _deadline(20),
        pytest.raises(
            ValueError,
            match=r"no tree is longer than min_length=5: with max_depth=1 and max_args=10 the "
            r"longest has 1 tokens\. Lower min_length below 1, or raise max_depth or max_args",
        ),
    ):
        generate_listops(100, ListOpsConfig(max_depth=1, min_length=5, max_length=50))


def test_listops_refuses_a_gap_in_the_tree_lengths():
    # With max_depth=2 and max_args=2 a tree is a digit (1 token) or [OP d d ] (4 tokens).
    cfg = ListOpsConfig(max_depth=2, max_args=2, min_length=1, max_length=4)
    with (
        _deadline(20),
        pytest.raises(
            ValueError,
            match=r"no ListOps tree with max_depth=2, max_args=2 has a length strictly between "
            r"min_length=1 and max_length=4",
        ),
    ):
        generate_listops(10, cfg)


def test_listops_refuses_more_unique_trees_than_exist():
    # 0 < length < 2 leaves the ten one-digit trees.
    cfg = ListOpsConfig(min_length=0, max_length=2)
    with (
        _deadline(20),
        pytest.raises(
            ValueError,
            match=r"generate_listops\(100, ...\) asks for 100 unique ListOps trees, but only 10 "
            r"distinct trees .* remain \(10 exist, 0 already taken\)\. .* or pass unique=False",
        ),
    ):
        generate_listops(100, cfg)
    with (
        _deadline(20),
        pytest.raises(ValueError, match=r"num_train \+ num_val \+ num_test asks for 11 unique"),
    ):
        load_task("listops", num_train=8, num_val=2, num_test=1, min_length=0, max_length=2)
    split = generate_listops(10, cfg, seed=0)  # all ten: feasible, and drawn
    assert sorted(split.labels.tolist()) == list(range(10))
    assert len(generate_listops(100, dataclasses.replace(cfg, unique=False))) == 100


def test_listops_gives_up_on_trees_too_rare_to_draw(monkeypatch):
    # Admissible trees exist (a root operator with 9 or 10 digits) but one draw in millions
    # makes one at this op_prob: the generator stops after _MAX_MISSES draws in a row.
    monkeypatch.setattr(listops, "_MAX_MISSES", 1000)
    cfg = ListOpsConfig(max_depth=2, min_length=10, max_length=13, op_prob=1e-6)
    with (
        _deadline(20),
        pytest.raises(
            ValueError,
            match=r"drew 1,000 trees in a row without a new one with 10 < length < 13 .*"
            r"op_prob=1e-06\): such trees are too rare",
        ),
    ):
        generate_listops(5, cfg)


def _tree_shapes(levels, max_args, budget):
    # Every tree shape of at most `budget` tokens whose root sits `levels` levels above
    # max_depth, by brute force, as (tokens, leaves, operators): a leaf is a digit, a node an
    # operator with 2..max_args children and its closing `]`.
    shapes = [(1, 1, 0)]
    if levels == 0 or budget < 4:
        return shapes
    children = _tree_shapes(levels - 1, max_args, budget - 2)
    for k in range(2, max_args + 1):
        for args in itertools.product(children, repeat=k):
            tokens = 2 + sum(a[0] for a in args)
            if tokens <= budget:
                shapes.append((tokens, sum(a[1] for a in args), 1 + sum(a[2] for a in args)))
    return shapes


@pytest.mark.parametrize(
    ("max_depth", "max_args", "min_length", "max_length"),
    [(2, 3, 0, 8), (3, 2, 3, 11), (3, 3, 5, 12), (4, 2, 10, 14)],
)
def test_listops_distinct_tree_count_matches_enumeration(
    max_depth, max_args, min_length, max_length
):
    # A token sequence is one tree: each shape stands for 10**leaves * 4**operators of them.
    shapes = _tree_shapes(max_depth - 1, max_args, max_length - 1)
    expected = sum(10**n * 4**m for t, n, m in shapes if min_length < t < max_length)
    assert listops._distinct_trees(max_depth, max_args, min_length, max_length) == expected


# ---------------------------------------------------------------- Pathfinder


def _seg_points(seg, k=9):
    t = np.linspace(0, 1, k)[:, None]
    return seg[0][None] + t * (seg[1] - seg[0])[None]


def _point_seg(p, a, b):
    d = b - a
    t = np.clip(((p - a) @ d) / max(d @ d, 1e-12), 0, 1)
    return np.linalg.norm(p - a - t[:, None] * d, axis=1)


def test_pathfinder_label_rule_by_construction():
    cfg = PathfinderConfig()
    images, labels, meta = generate_pathfinder(120, cfg, seed=0, return_metadata=True)
    assert images.shape == (120, 32, 32) and images.dtype == np.uint8
    assert labels.dtype == np.int32 and 0.3 < labels.mean() < 0.7
    same = meta.marker_snakes[:, 0] == meta.marker_snakes[:, 1]
    np.testing.assert_array_equal(labels, same.astype(np.int32))
    targets = [np.flatnonzero(meta.dash_snake == s) for s in (0, 1)]
    for i in range(len(labels)):
        for s in (0, 1):
            assert targets[s].size == cfg.contour_length
            assert not np.isnan(meta.dashes[i, targets[s]]).any()
        s0, s1 = meta.marker_snakes[i]
        np.testing.assert_allclose(meta.markers[i, 0], meta.dashes[i, targets[s0][0], 0], atol=1e-4)
        np.testing.assert_allclose(
            meta.markers[i, 1], meta.dashes[i, targets[s1][-1], 1], atol=1e-4
        )
        for m in meta.markers[i]:
            x, y = np.clip(m.astype(int), 0, 31)
            assert images[i, y, x] >= 200


def test_pathfinder_contours_keep_clearance():
    cfg = PathfinderConfig()
    _, _, meta = generate_pathfinder(25, cfg, seed=2, return_metadata=True)
    tol = 0.8  # occupancy-grid discretisation (half a cell diagonal plus sample spacing)
    for i in range(25):
        segs = meta.dashes[i]
        valid = ~np.isnan(segs[:, 0, 0])
        for j in np.flatnonzero(valid):
            pts = _seg_points(segs[j])
            for k in np.flatnonzero(valid & (meta.dash_snake != meta.dash_snake[j])):
                assert _point_seg(pts, segs[k, 0], segs[k, 1]).min() > cfg.clearance - tol


def test_pathfinder_reproducible_and_difficulty():
    a = generate_pathfinder(20, PathfinderConfig(), seed=5)
    b = generate_pathfinder(20, PathfinderConfig(), seed=5)
    np.testing.assert_array_equal(a[0], b[0])
    cfg = PathfinderConfig.for_difficulty("baseline")
    assert cfg.contour_length == 6 and cfg.distractor_dashes == 2
    with pytest.raises(ValueError, match="difficulty"):
        PathfinderConfig.for_difficulty("medium")


# ---------------------------------------------------------------- text / retrieval / image


def _decode(row, n):
    return bytes((row[:n] - 1).astype(np.uint8).tolist())


def test_synthetic_text_label_rule():
    cfg = SyntheticTextConfig(min_length=200, max_length=300)
    split = generate_text(300, cfg, seed=0)
    assert split.tokens.dtype == np.uint16 and 0.35 < split.labels.mean() < 0.65
    for row, n, y in zip(split.tokens, split.lengths, split.labels, strict=True):
        text = _decode(row, n)
        keys = re.findall(rb"<([a-z]+)>", text)
        assert len(keys) == 2
        first, last = text.index(b"<"), text.rindex(b">")
        assert first < 0.1 * n and last >= n - 0.1 * n
        assert (keys[0] == keys[1]) == bool(y)
    assert np.all(split.tokens[:, 300:] == 0)


def test_synthetic_retrieval_label_rule():
    cfg = SyntheticRetrievalConfig(min_length=100, max_length=150)
    split = generate_retrieval(200, cfg, seed=0)
    assert split.dual
    for i in range(len(split)):
        k1 = re.findall(rb"<([a-z]+)>", _decode(split.tokens[i], split.lengths[i]))
        k2 = re.findall(rb"<([a-z]+)>", _decode(split.tokens2[i], split.lengths2[i]))
        assert len(k1) == len(k2) == 1
        assert (k1 == k2) == bool(split.labels[i])


def test_digits_standin():
    pytest.importorskip("sklearn")
    task = load_task("image")
    assert task.name == "image_digits_standin"
    assert len(task.train) + len(task.val) + len(task.test) == 1797
    assert 265 <= len(task.val) <= 275 and 265 <= len(task.test) <= 275
    assert task.train.tokens.shape[1] == 1024 and task.train.tokens.dtype == np.uint8
    assert np.all(task.train.lengths == 1024)  # black pixels are not padding
    assert task.train.tokens.max() == 255
    for s in (task.train, task.val, task.test):
        assert np.bincount(s.labels, minlength=10).min() > 0.8 * len(s) / 10


@pytest.mark.parametrize("name", TASK_NAMES)
def test_load_task_offline_all_names(name):
    small = {
        "listops": dict(num_train=20, num_val=5, num_test=5, min_length=10, max_length=60),
        "text": dict(num_train=20, num_val=5, num_test=5, min_length=100, max_length=120),
        "retrieval": dict(num_train=20, num_val=5, num_test=5, min_length=50, max_length=60),
        "image": {},
        "pathfinder": dict(num_train=20, num_val=5, num_test=5),
        "pathx": dict(num_train=4, num_val=2, num_test=2),
    }[name]
    if name == "image":
        pytest.importorskip("sklearn")
    task = load_task(name, seed=1, **small)
    assert task.dual == (name == "retrieval")
    assert task.train.tokens.dtype in (np.uint8, np.uint16)
    if name == "pathx":
        assert task.train.tokens.shape[1] == 128 * 128
    with pytest.raises(ValueError, match="unsupported option|must be"):
        load_task(name, bogus_option=1)


_SMALL = {
    "listops": dict(min_length=10, max_length=60),
    "text": dict(min_length=100, max_length=120),
    "retrieval": dict(min_length=50, max_length=60),
    "pathfinder": {},
    "pathx": {},
}


@pytest.mark.parametrize("name", sorted(_SMALL))
def test_offline_task_with_an_empty_split(name):
    # load_task("pathfinder", None, num_train=8, num_val=0, num_test=4) once crashed in a
    # reshape; an empty split is a split of size 0 with the task's columns.
    task = load_task(name, None, num_train=8, num_val=0, num_test=4, **_SMALL[name])
    assert (len(task.train), len(task.val), len(task.test)) == (8, 0, 4)
    assert task.val.tokens.shape[0] == task.val.lengths.shape[0] == task.val.labels.shape[0] == 0
    if name in ("pathfinder", "pathx"):  # every image has the same number of pixels
        assert task.val.tokens.shape == (0, task.test.tokens.shape[1])
    assert task.val.dual == task.test.dual


@pytest.mark.parametrize(
    "config", [ListOpsConfig, SyntheticTextConfig, SyntheticRetrievalConfig, PathfinderConfig]
)
def test_negative_split_size_is_refused(config):
    with pytest.raises(
        ValueError, match=r"num_val must be >= 0 \(0 gives an empty split\), got -1"
    ):
        config(num_val=-1)


def test_digits_standin_with_an_empty_validation_split():
    pytest.importorskip("sklearn")
    task = load_task("image", val_fraction=0.0)
    assert len(task.val) == 0 and task.val.tokens.shape == (0, 1024)
    assert len(task.train) + len(task.test) == 1797
    with pytest.raises(ValueError, match=r"need 0 <= val_fraction, test_fraction and their sum"):
        load_task("image", val_fraction=-0.1)


def test_load_task_unknown_name():
    with pytest.raises(ValueError, match="listops"):
        load_task("cifar")
