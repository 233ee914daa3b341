"""ListOps: the official TSV reader and a generator faithful to LRA's `listops.py`.

Tokenization follows LRA: the closing bracket `]` is kept (LRA renames it `X` only because the
TFDS tokenizer drops punctuation), the parentheses of the `Source` column are dropped, and the
remaining 15 symbols get a **fixed** vocabulary (LRA's own ids follow Python set order and are
not stable across runs):

| id | 0 | 1 | 2 | 3 | 4 | 5 | 6..15 |
|---|---|---|---|---|---|---|---|
| symbol | pad | `[MIN` | `[MAX` | `[MED` | `[SM` | `]` | `0`..`9` |
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
from jaxtyping import Int32

from ._common import (
    LRA_SOURCE,
    check_positive,
    check_split_sizes,
    make_rng,
    read_lines,
    require_files,
)
from .batching import Split, TaskData, pad_sequences

__all__ = [
    "LISTOPS_VOCAB",
    "ListOpsConfig",
    "encode_listops",
    "evaluate_listops",
    "generate_listops",
    "listops_to_source",
    "load_listops",
    "make_listops_task",
    "read_listops_tsv",
    "write_listops_tsv",
]

LISTOPS_VOCAB: tuple[str, ...] = (
    "<pad>",
    "[MIN",
    "[MAX",
    "[MED",
    "[SM",
    "]",
    *(str(d) for d in range(10)),
)
"""The ListOps token ids: index 0 is the pad, then the four operators, `]` and the digits.

LRA's `Source` strings are tokenized by dropping `(` and `)` and keeping `]` (16 ids in all).
"""
_ID = {s: i for i, s in enumerate(LISTOPS_VOCAB)}
_CLOSE = 5
_DIGIT0 = 6
_SPLIT_FILES = {"train": "basic_train.tsv", "val": "basic_val.tsv", "test": "basic_test.tsv"}


@dataclasses.dataclass(frozen=True)
class ListOpsConfig:
    """Generator settings; defaults are LRA's published ones.

    **Arguments:**

    - `max_depth`: leaves are forced at this depth; the root is at depth 1, so operators nest
      at most `max_depth - 1` deep.
    - `max_args`: an operator takes `UniformInt[2, max_args]` arguments.
    - `min_length`, `max_length`: keep a tree only if `min_length < length < max_length`
      (strict, as LRA), where length counts operators, digits and `]`.
    - `op_prob`: probability that a node above `max_depth` is an operator.
    - `num_train`, `num_val`, `num_test`: split sizes (LRA: 96,000 / 2,000 / 2,000).
    - `unique`: reject duplicate trees across all splits, as LRA's set does.
    """

    max_depth: int = 10
    max_args: int = 10
    min_length: int = 500
    max_length: int = 2000
    op_prob: float = 0.25
    num_train: int = 96_000
    num_val: int = 2_000
    num_test: int = 2_000
    unique: bool = True

    def __post_init__(self) -> None:
        check_positive("max_depth", self.max_depth)
        if self.max_args < 2:
            raise ValueError(f"max_args must be >= 2, got {self.max_args}.")
        if not 0 <= self.min_length < self.max_length - 1:
            raise ValueError(
                "need 0 <= min_length < max_length - 1 so some length lies strictly between, "
                f"got min_length={self.min_length}, max_length={self.max_length}."
            )
        if not 0.0 < self.op_prob < 1.0:
            raise ValueError(f"op_prob must lie in (0, 1), got {self.op_prob}.")
        check_split_sizes(self)
        longest = 1  # a digit; then an operator with max_args children of the level below
        for _ in range(self.max_depth - 1):
            longest = min(2 + self.max_args * longest, self.max_length)
        if longest <= self.min_length:
            raise ValueError(
                f"no tree is longer than min_length={self.min_length}: with max_depth="
                f"{self.max_depth} and max_args={self.max_args} the longest has {longest} "
                f"tokens. Lower min_length below {longest}, or raise max_depth or max_args."
            )


def _apply(op: int, vals: list[int]) -> int:
    if op == 1:
        return min(vals)
    if op == 2:
        return max(vals)
    if op == 3:
        # int(np.median(vals)): for an even count, the floor of the mean of the middle two.
        s = sorted(vals)
        m = len(s) // 2
        return s[m] if len(s) % 2 else (s[m - 1] + s[m]) // 2
    return sum(vals) % 10


_COUNT_CAP = 1e15  # distinct trees are counted up to this many (float64 stays exact below)
_MAX_MISSES = 200_000  # draws in a row without a new tree before the generator gives up


@functools.cache
def _distinct_trees(max_depth: int, max_args: int, min_length: int, max_length: int) -> float:
    # Trees are their token sequences. counts[n] is the number of trees of n tokens whose root
    # sits `level` levels above max_depth: a digit (10 of length 1), or one of 4 operators with
    # 2..max_args children of the level below and a closing `]` (2 + their lengths).
    leaf = np.zeros(max_length)
    leaf[1] = 10.0
    counts = leaf
    for _ in range(max_depth - 1):
        children = counts
        operands = np.zeros(max_length)
        for _ in range(2, max_args + 1):
            children = np.minimum(np.convolve(children, counts)[:max_length], _COUNT_CAP)
            operands += children
        with_op = np.zeros(max_length)
        with_op[2:] = 4.0 * operands[:-2]
        counts = np.minimum(leaf + with_op, _COUNT_CAP)
        if counts[min_length + 1 :].sum() >= _COUNT_CAP:
            break  # a deeper tree only adds to the count
    return float(min(counts[min_length + 1 :].sum(), _COUNT_CAP))


def _check_supply(cfg: ListOpsConfig, count: int, seen: set[bytes], what: str) -> None:
    # Refuse, before drawing, a request that no number of draws could satisfy.
    if count == 0:
        return
    lo, hi = cfg.min_length, cfg.max_length
    setting = f"max_depth={cfg.max_depth}, max_args={cfg.max_args}"
    total = _distinct_trees(cfg.max_depth, cfg.max_args, lo, hi)
    if total == 0:
        raise ValueError(
            f"no ListOps tree with {setting} has a length strictly between min_length={lo} "
            f"and max_length={hi} (tree lengths skip values). Widen that range, or raise "
            "max_depth or max_args."
        )
    if not cfg.unique:
        return
    taken = sum(1 for key in seen if lo < len(key) < hi)
    if count > total - taken:
        raise ValueError(
            f"{what} asks for {count} unique ListOps trees, but only {total - taken:.0f} "
            f"distinct trees with {setting} and {lo} < length < {hi} remain "
            f"({total:.0f} exist, {taken} already taken). Widen (min_length, max_length), "
            "raise max_depth or max_args, ask for fewer examples, or pass unique=False."
        )


def _sample_trees(
    rng: np.random.Generator, cfg: ListOpsConfig, count: int, seen: set[bytes]
) -> tuple[list[bytes], list[int]]:
    # Iterative version of LRA's recursive gen(): same node distribution, but it stops a draw as
    # soon as it reaches max_length (it would be rejected anyway) and draws uniforms in bulk.
    max_depth, max_args, p = cfg.max_depth, cfg.max_args, cfg.op_prob
    lo, hi = cfg.min_length, cfg.max_length
    nargs = max_args - 1
    out: list[bytes] = []
    labels: list[int] = []
    buf: list[float] = []
    i = 0
    misses = 0
    while len(out) < count:
        if misses == _MAX_MISSES:
            raise ValueError(
                f"the ListOps generator drew {_MAX_MISSES:,} trees in a row without a new one "
                f"with {lo} < length < {hi} (max_depth={max_depth}, max_args={max_args}, "
                f"op_prob={p}): such trees are too rare at these settings. Widen (min_length, "
                "max_length), change op_prob, ask for fewer examples"
                + (", or pass unique=False." if cfg.unique else ".")
            )
        misses += 1
        toks = bytearray()
        stack: list[tuple[int, int, list[int]]] = []
        depth = 1
        value = -1
        while True:
            if i + 3 > len(buf):
                buf = rng.random(1 << 16).tolist()
                i = 0
            if depth < max_depth and buf[i] <= p:
                op = 1 + int(buf[i + 1] * 4)
                k = 2 + int(buf[i + 2] * nargs)
                i += 3
                toks.append(op)
                stack.append((op, k, []))
                depth += 1
            else:
                v = int(buf[i + 1] * 10)
                i += 2
                toks.append(_DIGIT0 + v)
                while stack:
                    op, k, vals = stack[-1]
                    vals.append(v)
                    if len(vals) < k:
                        break
                    stack.pop()
                    depth -= 1
                    toks.append(_CLOSE)
                    v = _apply(op, vals)
                if not stack:
                    value = v
                    break
            if len(toks) >= hi:
                break
        if value < 0 or not lo < len(toks) < hi:
            continue
        key = bytes(toks)
        if cfg.unique:
            if key in seen:
                continue
            seen.add(key)
        out.append(key)
        labels.append(value)
        misses = 0
    return out, labels


def generate_listops(
    num_examples: int,
    config: ListOpsConfig = ListOpsConfig(),
    seed: int | np.random.Generator = 0,
    exclude: set[bytes] | None = None,
) -> Split:
    """Generate ListOps examples with LRA's algorithm.

    Each node above `max_depth` is an operator with probability `op_prob` (uniform over MIN,
    MAX, MED, SM with `UniformInt[2, max_args]` arguments), otherwise a uniform digit; trees
    whose token count is not strictly between `min_length` and `max_length` are rejected. MED
    is `int(np.median(args))`; SM is `sum(args) % 10`. About 17% of labels are 0 and 17% are 9
    at LRA's settings.

    **Arguments:**

    - `num_examples`: how many trees to return.
    - `config`: generator settings.
    - `seed`: int seed or a `np.random.Generator`; the output is a pure function of it.
    - `exclude`: byte strings of trees to reject (and to which new trees are added), so that
      separately generated splits are disjoint.

    **Returns:**

    A `Split` with uint8 tokens (ids per `LISTOPS_VOCAB`).

    **Raises:**

    `ValueError` naming the settings to change if no tree has an admissible length, if fewer
    distinct trees exist than `unique` examples are asked for, or if 200,000 draws in a row
    bring no new tree (admissible trees too rare to draw).
    """
    rng = make_rng(seed)
    seen = set() if exclude is None else exclude
    _check_supply(config, num_examples, seen, f"generate_listops({num_examples}, ...)")
    trees, labels = _sample_trees(rng, config, num_examples, seen)
    tokens, lengths = pad_sequences(trees, max_length=config.max_length)
    return Split(tokens=tokens, lengths=lengths, labels=np.asarray(labels, dtype=np.int32))


def make_listops_task(config: ListOpsConfig = ListOpsConfig(), seed: int = 0) -> TaskData:
    """Generate a ListOps task with disjoint train/val/test splits.

    **Arguments:**

    - `config`: generator settings, including split sizes.
    - `seed`: int seed.

    **Returns:**

    `TaskData` with vocab size 16 and 10 classes.

    **Raises:**

    `ValueError` as `generate_listops`, for the three splits together.
    """
    rng = np.random.default_rng(seed)
    seen: set[bytes] = set()
    total = config.num_train + config.num_val + config.num_test
    _check_supply(config, total, seen, "num_train + num_val + num_test")
    splits = [
        generate_listops(n, config, rng, seen)
        for n in (config.num_train, config.num_val, config.num_test)
    ]
    return TaskData(
        *splits,
        vocab_size=len(LISTOPS_VOCAB),
        num_classes=10,
        dual=False,
        name="listops",
        description=(
            f"ListOps generated offline with LRA's algorithm (seed {seed}, max_depth "
            f"{config.max_depth}, max_args {config.max_args}, {config.min_length} < length < "
            f"{config.max_length}); vocab: {' '.join(LISTOPS_VOCAB)}."
        ),
    )


def evaluate_listops(tokens: np.ndarray) -> int:
    """Evaluate one token sequence (ids per `LISTOPS_VOCAB`, padding allowed) to its value.

    **Arguments:**

    - `tokens`: 1-D id sequence.

    **Returns:**

    The value 0-9.

    **Raises:**

    `ValueError` if the sequence is not a well-formed expression.
    """
    stack: list[tuple[int, list[int]]] = []
    result: int | None = None
    for t in (int(x) for x in tokens):
        if t == 0:
            continue
        if result is not None:
            raise ValueError("trailing tokens after a complete ListOps expression.")
        if 1 <= t <= 4:
            stack.append((t, []))
        elif t == _CLOSE:
            if not stack or len(stack[-1][1]) == 0:
                raise ValueError("']' without an open operator or with no arguments.")
            op, vals = stack.pop()
            v = _apply(op, vals)
            if stack:
                stack[-1][1].append(v)
            else:
                result = v
        elif _DIGIT0 <= t < _DIGIT0 + 10:
            if stack:
                stack[-1][1].append(t - _DIGIT0)
            else:
                result = t - _DIGIT0
        else:
            raise ValueError(f"token id {t} is not in the ListOps vocabulary (0-15).")
    if result is None:
        raise ValueError("incomplete ListOps expression (unclosed operator or empty).")
    return result


def listops_to_source(tokens: np.ndarray) -> str:
    """Render a token sequence in LRA's fully parenthesised `Source` format.

    An operator with arguments `a1..ak` is nested as `((((op a1) a2) ... ak) ])`, e.g.
    `[MAX 2 9 ]` becomes `( ( ( [MAX 2 ) 9 ) ] )`.

    **Arguments:**

    - `tokens`: 1-D id sequence (padding ignored).

    **Returns:**

    The `Source` string.
    """
    # Build nested lists, then render; depth is bounded by max_depth so recursion is safe.
    root: list[object] = []
    stack: list[list[object]] = [root]
    for t in (int(x) for x in tokens):
        if t == 0:
            continue
        if 1 <= t <= 4:
            node: list[object] = [LISTOPS_VOCAB[t]]
            stack[-1].append(node)
            stack.append(node)
        elif t == _CLOSE:
            stack.pop()
        else:
            stack[-1].append(LISTOPS_VOCAB[t])

    def render(x: object) -> str:
        if isinstance(x, str):
            return x
        assert isinstance(x, list)
        s = f"( {x[0]} {render(x[1])} )"
        for arg in x[2:]:
            s = f"( {s} {render(arg)} )"
        return f"( {s} ] )"

    return render(root[0])


def encode_listops(source: str, where: str = "<string>") -> list[int]:
    """Tokenize an LRA `Source` string: drop parentheses, keep `]`, map to `LISTOPS_VOCAB` ids.

    **Arguments:**

    - `source`: the `Source` column text.
    - `where`: location for error messages (e.g. `file:line`).

    **Returns:**

    The id list.

    **Raises:**

    `ValueError` naming `where` and the token if a symbol is outside the vocabulary.
    """
    toks = source.replace("(", " ").replace(")", " ").split()
    try:
        return [_ID[t] for t in toks if t != "<pad>"]
    except KeyError as exc:
        raise ValueError(
            f"{where}: unknown ListOps token {exc.args[0]!r}; expected one of "
            f"{', '.join(LISTOPS_VOCAB[1:])} or parentheses."
        ) from None


def read_listops_tsv(path: str | Path, max_length: int | None = 2000) -> Split:
    """Read one official ListOps TSV (header `Source\\tTarget`).

    **Arguments:**

    - `path`: e.g. `listops-1000/basic_train.tsv`.
    - `max_length`: truncate sequences to this many tokens (LRA uses 2000, above every
      example's length); `None` keeps everything.

    **Returns:**

    A `Split` with uint8 tokens.

    **Raises:**

    `FileNotFoundError` if missing; `ValueError` naming the file and line for bytes that are
    not UTF-8, a wrong header, a row without exactly two tab-separated columns, a non-integer
    or out-of-range target, an empty source or an unknown token.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ListOps file not found: {path}.")
    seqs: list[np.ndarray] = []
    labels: list[int] = []
    lines = read_lines(path)
    header = next(lines, (1, ""))[1]
    if header.split("\t") != ["Source", "Target"]:
        raise ValueError(f"{path}:1: expected the header 'Source\\tTarget', got {header[:80]!r}.")
    for lineno, line in lines:
        if not line:
            continue
        cols = line.split("\t")
        if len(cols) != 2:
            raise ValueError(
                f"{path}:{lineno}: expected 2 tab-separated columns (Source, Target), got "
                f"{len(cols)}."
            )
        where = f"{path}:{lineno}"
        try:
            label = int(cols[1])
        except ValueError:
            raise ValueError(f"{where}: Target {cols[1]!r} is not an integer.") from None
        if not 0 <= label <= 9:
            raise ValueError(f"{where}: Target must be 0-9, got {label}.")
        ids = encode_listops(cols[0], where)
        if not ids:
            raise ValueError(f"{where}: Source has no tokens.")
        seqs.append(np.asarray(ids, dtype=np.uint8))
        labels.append(label)
    if not seqs:
        raise ValueError(f"{path}: no examples after the header.")
    tokens, lengths = pad_sequences(seqs, max_length=max_length)
    return Split(tokens=tokens, lengths=lengths, labels=np.asarray(labels, dtype=np.int32))


def write_listops_tsv(path: str | Path, split: Split) -> None:
    """Write a split in the official ListOps TSV format (header, parenthesised `Source`).

    **Arguments:**

    - `path`: destination file.
    - `split`: ListOps split (ids per `LISTOPS_VOCAB`).
    """
    with open(path, "w", encoding="utf-8") as f:
        f.write("Source\tTarget\n")
        for row, n, y in zip(split.tokens, split.lengths, split.labels, strict=True):
            f.write(f"{listops_to_source(row[:n])}\t{int(y)}\n")


def _listops_dir(data_dir: Path) -> Path:
    sub = data_dir / "listops-1000"
    return sub if sub.is_dir() else data_dir


def load_listops(data_dir: str | Path, max_length: int | None = 2000) -> TaskData:
    """Load the official ListOps splits.

    **Arguments:**

    - `data_dir`: the extracted LRA release directory containing `listops-1000/`, or the
      `listops-1000` directory itself.
    - `max_length`: see `read_listops_tsv`.

    **Returns:**

    `TaskData` (vocab 16, 10 classes).

    **Raises:**

    `FileNotFoundError` listing the expected files and the data's origin if any is missing.
    """
    root = _listops_dir(Path(data_dir))
    require_files("listops", root, list(_SPLIT_FILES.values()), LRA_SOURCE)
    splits = {k: read_listops_tsv(root / v, max_length) for k, v in _SPLIT_FILES.items()}
    return TaskData(
        splits["train"],
        splits["val"],
        splits["test"],
        vocab_size=len(LISTOPS_VOCAB),
        num_classes=10,
        dual=False,
        name="listops",
        description=f"Official LRA ListOps from {root}; parentheses dropped, ']' kept.",
    )


def label_histogram(labels: Int32[np.ndarray, " n"]) -> np.ndarray:
    """Fraction of each label 0-9 (helper for checking the known 17%/8% skew)."""
    return np.bincount(labels, minlength=10) / max(1, labels.shape[0])
