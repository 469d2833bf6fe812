"""Zero-shot classifier (prompt ensembling), top-k accuracy, mean per-class recall, chance."""

from __future__ import annotations

import math

import pytest
import torch

from vlalign.eval.zero_shot import (
    per_class_accuracy,
    true_class_ranks,
    zero_shot_chance,
    zero_shot_classifier,
    zero_shot_metrics,
)


def test_classifier_averages_normalised_templates_and_renormalises():
    class_text_embs = torch.tensor(
        [
            [[2.0, 0.0], [0.0, 1.0]],  # class 0: templates along x (unnormalised) and y
            [[0.0, -1.0], [0.0, -1.0]],  # class 1: both templates along -y
        ]
    )  # (C=2, T=2, D=2)
    classifier = zero_shot_classifier(class_text_embs)
    assert classifier.shape == (2, 2)
    s = 1 / math.sqrt(2)
    assert torch.allclose(classifier, torch.tensor([[s, s], [0.0, -1.0]]))


def test_classifier_rejects_wrong_shape():
    with pytest.raises(ValueError, match=r"\(C classes, T templates, D\)"):
        zero_shot_classifier(torch.ones(3, 4))


# Six classes, five samples. True-class ranks (other classes scoring >= the true one):
#   sample 0, label 0: true logit 9 is the max                       -> rank 0
#   sample 1, label 0: 3 classes above the true logit 5              -> rank 3
#   sample 2, label 1: 5 classes above the true logit 0              -> rank 5
#   sample 3, label 2: true logit 7 is the max                       -> rank 0
#   sample 4, label 2: one class ties with the true logit 8 (max)   -> rank 1
LOGITS = torch.tensor(
    [
        [9.0, 1.0, 2.0, 3.0, 4.0, 5.0],
        [5.0, 6.0, 7.0, 8.0, 1.0, 2.0],
        [1.0, 0.0, 2.0, 3.0, 4.0, 5.0],
        [1.0, 2.0, 7.0, 3.0, 4.0, 5.0],
        [1.0, 2.0, 8.0, 8.0, 4.0, 5.0],
    ]
)
LABELS = torch.tensor([0, 0, 1, 2, 2])


def test_metrics_by_hand():
    assert true_class_ranks(LOGITS, LABELS).tolist() == [0, 3, 5, 0, 1]
    metrics = zero_shot_metrics(LOGITS, LABELS)
    assert list(metrics) == ["acc1", "acc5", "mean_per_class_recall"]
    assert metrics["acc1"] == pytest.approx(2 / 5)
    assert metrics["acc5"] == pytest.approx(4 / 5)
    # Per-class top-1 recall: class 0 -> 1/2, class 1 -> 0/1, class 2 -> 1/2 (the tie counts as a miss);
    # classes 3-5 have no samples and are left out of the mean, like sklearn's balanced accuracy.
    assert metrics["mean_per_class_recall"] == pytest.approx((0.5 + 0.0 + 0.5) / 3)


def test_per_class_accuracy_marks_absent_classes_nan():
    acc = per_class_accuracy(LOGITS, LABELS)
    assert acc[:3].tolist() == [0.5, 0.0, 0.5]
    assert torch.isnan(acc[3:]).all()


def test_constant_logits_score_zero_below_the_class_count():
    logits = torch.zeros(4, 6)
    metrics = zero_shot_metrics(logits, torch.tensor([0, 1, 2, 3]), ks=(1, 5, 6))
    assert metrics == {"acc1": 0.0, "acc5": 0.0, "acc6": 1.0, "mean_per_class_recall": 0.0}


def test_fewer_classes_than_k_clamps_k():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.2, 0.3, 0.5]])
    metrics = zero_shot_metrics(logits, torch.tensor([0, 2]))
    assert metrics["acc1"] == 0.5
    assert metrics["acc5"] == 1.0  # k clamped to C = 3
    assert zero_shot_chance(torch.tensor([0, 2]), 3)["acc5"] == 1.0


def test_matches_topk_and_balanced_accuracy_on_untied_logits():
    gen = torch.Generator().manual_seed(0)
    n, c = 400, 12
    labels = torch.randint(0, c, (n,), generator=gen)
    logits = torch.randn(n, c, generator=gen) + 1.5 * torch.nn.functional.one_hot(labels, c)
    top = logits.topk(5, dim=1).indices  # (N, 5), CLIP_benchmark's accuracy()
    acc1 = (top[:, :1] == labels[:, None]).any(1).float().mean().item()
    acc5 = (top == labels[:, None]).any(1).float().mean().item()
    pred = logits.argmax(1)
    balanced = sum((pred[labels == k] == k).float().mean().item() for k in labels.unique()) / len(labels.unique())
    metrics = zero_shot_metrics(logits, labels)
    assert metrics["acc1"] == pytest.approx(acc1)
    assert metrics["acc5"] == pytest.approx(acc5)
    assert metrics["mean_per_class_recall"] == pytest.approx(balanced)
    assert 0.1 < acc1 < 0.9  # the comparison is not vacuous


def test_chance_values_and_monte_carlo():
    labels = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5, 6])
    chance = zero_shot_chance(labels, 8, ks=(1, 5))
    assert chance == {"acc1": 1 / 8, "acc5": 5 / 8, "mean_per_class_recall": 1 / 8}
    gen = torch.Generator().manual_seed(1)
    trials = 400
    samples = torch.tensor(
        [list(zero_shot_metrics(torch.randn(len(labels), 8, generator=gen), labels).values()) for _ in range(trials)],
        dtype=torch.float64,
    )  # (trials, 3)
    stderr = samples.std(dim=0) / math.sqrt(trials)
    expected = torch.tensor(list(chance.values()), dtype=torch.float64)
    assert ((samples.mean(dim=0) - expected).abs() < 4.5 * stderr).all()


@pytest.mark.parametrize(
    ("logits", "labels", "message"),
    [
        (torch.zeros(2, 3), torch.tensor([0, 3]), r"labels\[1\] = 3 is outside \[0, 3\)"),
        (torch.zeros(2, 3), torch.tensor([0]), "1 entries but logits has 2 rows"),
        (torch.zeros(3), torch.tensor([0]), r"shape \(N samples, C classes\)"),
        (torch.tensor([[0.0, float("nan")]]), torch.tensor([0]), "row 0 holds NaN"),
        (torch.zeros(1, 2), torch.tensor([0.0]), "integer tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(logits, labels, message):
    with pytest.raises(ValueError, match=message):
        zero_shot_metrics(logits, labels)


def test_chance_checks_labels_against_class_count():
    with pytest.raises(ValueError, match="outside"):
        zero_shot_chance(torch.tensor([0, 9]), 5)
