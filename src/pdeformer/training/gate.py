"""The learning gate: does a trained model beat the trivial rules of its task?

A model that scores what a one-feature rule scores has learned nothing a study can draw a
conclusion from. A *rule* maps a split to one feature per example (the majority rule: a
constant; ListOps' outermost-operator rule: the first token). Fitted on the training split,
it answers, for each feature value, the most frequent training label. The gate compares a
model with the best such rule on the test split, on two counts:

- its test accuracy must beat the rule's by at least `min_accuracy_margin` (5 points);
- its final training loss must lie at least `min_loss_margin` (0.2 nats) below the
  conditional label entropy given the rule's feature, estimated on the training split (for
  the majority rule, the label entropy). A cross-entropy at that level is what a model that
  has learned only the feature reaches.

Everything here is numpy on the host: no JAX, no compilation.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import numpy as np

from ..data import Split, TaskData

__all__ = [
    "AbstractRule",
    "FeatureRule",
    "GateResult",
    "MajorityRule",
    "OutermostOperatorRule",
    "RuleScore",
    "conditional_entropy",
    "final_train_loss",
    "learning_gate",
    "score_rule",
    "task_rules",
]


class AbstractRule(eqx.Module):
    """A one-feature rule: maps a split to one hashable feature per example.

    A subclass implements `name` and `features`; the fitting (the most frequent training
    label per feature value) is the same for every rule (`score_rule`).
    """

    name: eqx.AbstractVar[str]

    @abc.abstractmethod
    def features(self, split: Split) -> np.ndarray:
        """One feature per example of `split`: a 1-D array of length `len(split)`."""


class MajorityRule(AbstractRule):
    """The majority class: a constant feature, so the rule answers the most frequent label."""

    name: str = eqx.field(default="majority class", static=True)

    def features(self, split: Split) -> np.ndarray:
        return np.zeros(len(split), dtype=np.int64)


class OutermostOperatorRule(AbstractRule):
    """ListOps: the most frequent training label for the outermost operator.

    The feature is the first token of each sequence (ids per `pdeformer.data.LISTOPS_VOCAB`:
    1-4 for `[MIN`, `[MAX`, `[MED`, `[SM`), which is the root's operator: a ListOps sequence
    is written prefix-first and padded at the end. A tree that is a single digit has that
    digit as its feature (and as its label); an empty row has the pad id 0.
    """

    name: str = eqx.field(default="outermost operator", static=True)

    def features(self, split: Split) -> np.ndarray:
        if split.tokens.shape[1] == 0:
            return np.zeros(len(split), dtype=np.int64)
        first = split.tokens[:, 0].astype(np.int64)
        return np.where(split.lengths > 0, first, 0)


class FeatureRule(AbstractRule):
    """A rule from any function of a split, for a task's own one-feature rules.

    **Arguments:**

    - `name`: how the rule is named in reports.
    - `fn`: `fn(split)` returns one feature per example (a 1-D array of length `len(split)`).
    """

    name: str = eqx.field(static=True)
    fn: Callable[[Split], np.ndarray] = eqx.field(static=True)

    def features(self, split: Split) -> np.ndarray:
        return np.asarray(self.fn(split))


def _check_pair(features: np.ndarray, labels: np.ndarray, what: str) -> None:
    if features.ndim != 1 or labels.ndim != 1:
        raise ValueError(
            f"{what}: features and labels must be 1-D, got shapes {features.shape} and "
            f"{labels.shape}."
        )
    if features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{what}: one feature per example is needed, got {features.shape[0]} features for "
            f"{labels.shape[0]} labels."
        )
    if labels.shape[0] == 0:
        raise ValueError(f"{what}: the split is empty; a rule needs at least one example.")


def _codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniq, inverse = np.unique(values, return_inverse=True)
    return uniq, inverse.reshape(-1)


def conditional_entropy(features: np.ndarray, labels: np.ndarray) -> float:
    """The plug-in conditional entropy `H(label | feature)` of a sample, in nats.

    `sum_f p(f) H(label | feature = f)` with the empirical frequencies; a constant feature
    gives the label entropy.

    **Arguments:**

    - `features`: 1-D array, one feature per example (any values `np.unique` can sort).
    - `labels`: 1-D integer array of the same length.

    **Returns:**

    The entropy in nats, `>= 0`.

    **Raises:**

    `ValueError` for an empty sample or mismatched lengths.
    """
    features, labels = np.asarray(features), np.asarray(labels)
    _check_pair(features, labels, "conditional_entropy")
    _, f = _codes(features)
    _, y = _codes(labels)
    counts = np.zeros((int(f.max()) + 1, int(y.max()) + 1), dtype=np.float64)
    np.add.at(counts, (f, y), 1.0)
    n = labels.shape[0]
    per_feature = counts.sum(axis=1, keepdims=True)
    nz = counts > 0
    # -sum_{f,y} n(f,y)/n * log(n(f,y)/n(f))
    ratio = np.where(nz, counts / per_feature, 1.0)
    return float(max(0.0, -np.sum(counts[nz] * np.log(ratio[nz])) / n))


@dataclasses.dataclass(frozen=True)
class RuleScore:
    """One trivial rule fitted on a training split and scored on a test split.

    - `name`: the rule's name.
    - `test_accuracy`: its accuracy on the test split, in `[0, 1]`.
    - `conditional_entropy`: `H(label | feature)` on the training split, in nats.
    - `num_features`: how many distinct feature values the training split has.
    """

    name: str
    test_accuracy: float
    conditional_entropy: float
    num_features: int


def score_rule(rule: AbstractRule, train: Split, test: Split) -> RuleScore:
    """Fit a rule on `train` and score it on `test`.

    For each feature value seen in training the rule answers the most frequent training
    label (ties: the smallest label); a feature value not seen in training gets the most
    frequent training label overall.

    **Arguments:**

    - `rule`: an `AbstractRule`.
    - `train`, `test`: the splits.

    **Returns:**

    A `RuleScore`.

    **Raises:**

    `ValueError` for an empty split or a rule that does not return one feature per example.
    """
    what = f"rule {rule.name!r}"
    f_train = np.asarray(rule.features(train))
    f_test = np.asarray(rule.features(test))
    _check_pair(f_train, train.labels, f"{what} on the training split")
    _check_pair(f_test, test.labels, f"{what} on the test split")
    uniq, codes = _codes(f_train)
    num_labels = int(max(train.labels.max(), test.labels.max())) + 1
    if int(min(train.labels.min(), test.labels.min())) < 0:
        raise ValueError(f"{what}: labels must be >= 0.")
    counts = np.zeros((uniq.shape[0], num_labels), dtype=np.int64)
    np.add.at(counts, (codes, train.labels), 1)
    answer = counts.argmax(axis=1)  # argmax takes the first maximum: the smallest label
    fallback = int(np.bincount(train.labels, minlength=num_labels).argmax())
    pos = np.clip(np.searchsorted(uniq, f_test), 0, uniq.shape[0] - 1)
    seen = uniq[pos] == f_test
    pred = np.where(seen, answer[pos], fallback)
    return RuleScore(
        name=rule.name,
        test_accuracy=float(np.mean(pred == test.labels)),
        conditional_entropy=conditional_entropy(f_train, train.labels),
        num_features=int(uniq.shape[0]),
    )


def task_rules(task: TaskData) -> tuple[AbstractRule, ...]:
    """The trivial rules for a task: the majority class, and for ListOps the outermost operator.

    **Arguments:**

    - `task`: a `TaskData` (its `name` decides: `listops` gains `OutermostOperatorRule`).

    **Returns:**

    A tuple of rules for `learning_gate`.
    """
    if task.name == "listops":
        return (MajorityRule(), OutermostOperatorRule())
    return (MajorityRule(),)


def final_train_loss(history: Sequence[Mapping[str, Any]], last: int = 50) -> float:
    """The mean training loss over the last `last` steps of a `training.train` history.

    One step's loss is that of one batch; the mean over the last steps is what the gate
    compares with a rule's conditional entropy.

    **Arguments:**

    - `history`: the records returned by `training.train` (each with a `loss`).
    - `last`: how many final steps to average (fewer if the run is shorter).

    **Returns:**

    The mean loss in nats.

    **Raises:**

    `ValueError` for an empty history or `last < 1`.
    """
    if last < 1:
        raise ValueError(f"last must be >= 1, got {last}.")
    if not history:
        raise ValueError("the training history is empty: there is no final loss.")
    return float(np.mean([float(r["loss"]) for r in history[-last:]]))


@dataclasses.dataclass(frozen=True)
class GateResult:
    """The verdict of `learning_gate`, small enough to head a results page.

    - `passed`: whether the model passed both criteria.
    - `reason`: one line saying why, with the numbers.
    - `rules`: the score of every rule, in the order given.
    - `best_rule`: the rule the model is compared with (highest test accuracy).
    - `test_accuracy`, `final_train_loss`: the model's numbers.
    - `accuracy_margin`: model's test accuracy minus the best rule's (a fraction; 0.05 is 5
      points).
    - `loss_margin`: the best rule's conditional entropy minus the model's final training
      loss, in nats.
    - `min_accuracy_margin`, `min_loss_margin`: the thresholds applied.
    """

    passed: bool
    reason: str
    rules: tuple[RuleScore, ...]
    best_rule: RuleScore
    test_accuracy: float
    final_train_loss: float
    accuracy_margin: float
    loss_margin: float
    min_accuracy_margin: float
    min_loss_margin: float

    def markdown(self) -> str:
        """The verdict as a Markdown paragraph and a table of the rules, for a results page."""
        lines = [
            f"**Learning gate: {'passed' if self.passed else 'FAILED'}.** {self.reason}",
            "",
            "| rule | test accuracy | H(label given feature), nats |",
            "|---|---|---|",
        ]
        for r in self.rules:
            lines.append(f"| {r.name} | {r.test_accuracy:.1%} | {r.conditional_entropy:.3f} |")
        lines.append(
            f"| **model** | {self.test_accuracy:.1%} | final training loss "
            f"{self.final_train_loss:.3f} |"
        )
        return "\n".join(lines)


def learning_gate(
    train: Split,
    test: Split,
    test_accuracy: float,
    final_train_loss: float,
    rules: Sequence[AbstractRule] = (MajorityRule(),),
    *,
    min_accuracy_margin: float = 0.05,
    min_loss_margin: float = 0.2,
) -> GateResult:
    """Decide whether a trained model learned more than the task's trivial rules.

    The model passes if its test accuracy beats the best rule's (highest test accuracy; ties:
    lower conditional entropy, then the first given) by at least `min_accuracy_margin`, and
    its final training loss lies at least `min_loss_margin` nats below that rule's
    conditional label entropy on the training split.

    **Arguments:**

    - `train`, `test`: the splits the model was trained and tested on.
    - `test_accuracy`: the model's accuracy on `test`, in `[0, 1]`.
    - `final_train_loss`: its final training cross-entropy in nats (e.g.
      `final_train_loss(history)`, the mean over the last steps).
    - `rules`: the trivial rules (`task_rules(task)` for a task's own).
    - `min_accuracy_margin`: required accuracy margin, a fraction (0.05: 5 points).
    - `min_loss_margin`: required loss margin in nats.

    **Returns:**

    A `GateResult`.

    **Raises:**

    `ValueError` for an empty split, no rules, a rule that does not return one feature per
    example, an accuracy outside `[0, 1]`, or a non-finite or negative loss or margin.
    """
    if not rules:
        raise ValueError("learning_gate needs at least one rule; pass e.g. (MajorityRule(),).")
    if not (math.isfinite(test_accuracy) and 0.0 <= test_accuracy <= 1.0):
        raise ValueError(
            f"test_accuracy must be a fraction in [0, 1], got {test_accuracy} (pass 0.93, not 93)."
        )
    if not (math.isfinite(final_train_loss) and final_train_loss >= 0.0):
        raise ValueError(f"final_train_loss must be finite and >= 0, got {final_train_loss}.")
    for name, value in (
        ("min_accuracy_margin", min_accuracy_margin),
        ("min_loss_margin", min_loss_margin),
    ):
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"{name} must be finite and >= 0, got {value}.")
    for name, split in (("training", train), ("test", test)):
        if len(split) == 0:
            raise ValueError(f"the {name} split is empty; the gate needs examples in both.")
    scores = tuple(score_rule(rule, train, test) for rule in rules)
    best = max(
        enumerate(scores), key=lambda p: (p[1].test_accuracy, -p[1].conditional_entropy, -p[0])
    )[1]
    acc_margin = test_accuracy - best.test_accuracy
    loss_margin = best.conditional_entropy - final_train_loss
    # A float tolerance, so that exactly 5 points (0.90 - 0.85) counts as 5 points.
    acc_ok = acc_margin >= min_accuracy_margin - 1e-12
    loss_ok = loss_margin >= min_loss_margin - 1e-12
    passed = acc_ok and loss_ok
    acc_text = (
        f"test accuracy {test_accuracy:.1%} is {100 * acc_margin:+.1f} points from the best "
        f"trivial rule ({best.name}, {best.test_accuracy:.1%}; need >= "
        f"{100 * min_accuracy_margin:+.1f})"
    )
    loss_text = (
        f"final training loss {final_train_loss:.3f} is {loss_margin:+.3f} nats below its "
        f"conditional entropy {best.conditional_entropy:.3f} (need >= {min_loss_margin:.3f})"
    )
    if passed:
        reason = f"passed: {acc_text}, and {loss_text}."
    else:
        failed = [t for ok, t in ((acc_ok, acc_text), (loss_ok, loss_text)) if not ok]
        reason = "FAILED: " + "; ".join(failed) + "; draw no conclusion from this run."
    return GateResult(
        passed=passed,
        reason=reason,
        rules=scores,
        best_rule=best,
        test_accuracy=float(test_accuracy),
        final_train_loss=float(final_train_loss),
        accuracy_margin=float(acc_margin),
        loss_margin=float(loss_margin),
        min_accuracy_margin=float(min_accuracy_margin),
        min_loss_margin=float(min_loss_margin),
    )
