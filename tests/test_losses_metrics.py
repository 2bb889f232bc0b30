"""Losses and retrieval metrics against values computed by hand on tiny cases."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hetero.maths import compatibility_matrix, retrieval_metrics, summarise
from hetero.losses import CosineRegression, CrossContrastive, L2Regression, RelationalDistillation, SharedClassifier


def unit(*angles_deg):
    return torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in angles_deg])


def test_cosine_and_l2_regression_by_hand():
    query, reference = unit(0, 90), unit(60, 90)
    labels = torch.tensor([0, 1])
    # 1 - cos: (1 - 0.5) and (1 - 1) -> mean 0.25; squared distance: 2 - 2cos -> (1, 0) -> mean 0.5
    assert CosineRegression()(query, reference, labels).item() == pytest.approx(0.25)
    assert L2Regression()(query, reference, labels).item() == pytest.approx(0.5)


def test_relational_distillation_by_hand():
    t = 0.5
    query, reference = unit(0, 90), unit(0, 60)
    # target rows: softmax(reference @ reference.T / t); student rows: softmax(query @ reference.T / t)
    ref_sim = torch.tensor([[1.0, 0.5], [0.5, 1.0]]) / t
    student = torch.tensor([[1.0, 0.5], [0.0, math.cos(math.radians(30))]]) / t
    p, log_q = ref_sim.softmax(1), student.log_softmax(1)
    expected = (p * (p.log() - log_q)).sum(1).mean().item()
    value = RelationalDistillation(temperature=t)(query, reference, torch.tensor([0, 1])).item()
    assert value == pytest.approx(expected, rel=1e-5)
    # identical query and reference embeddings: nothing to distil
    assert RelationalDistillation(t)(reference, reference, torch.tensor([0, 1])).item() == pytest.approx(0, abs=1e-6)


def test_cross_contrastive_by_hand():
    t = 0.1
    query, reference = unit(0, 90, 180), unit(10, 80, 200)
    labels = torch.tensor([0, 0, 1])
    sim = query @ reference.T / t
    losses = []
    for i in range(3):  # supervised contrastive: every same-label reference is a positive
        log_prob = sim[i] - torch.logsumexp(sim[i], dim=0)
        positives = (labels == labels[i]).nonzero().flatten()
        losses.append(-log_prob[positives].mean())
    expected = torch.stack(losses).mean().item()
    assert CrossContrastive(temperature=t)(query, reference, labels).item() == pytest.approx(expected, rel=1e-4)


def test_aligned_embeddings_score_lower_than_misaligned():
    torch.manual_seed(0)
    labels = torch.arange(16) // 4
    reference = F.normalize(torch.randn(4, 8)[labels] + 0.3 * torch.randn(16, 8), dim=1)  # clustered by class
    misaligned = F.normalize(torch.randn(16, 8), dim=1)
    for loss in (CrossContrastive(), CosineRegression(), RelationalDistillation()):
        assert loss(reference, reference, labels) < loss(misaligned, reference, labels)


def test_shared_classifier_prefers_embeddings_at_their_prototype():
    head = SharedClassifier(num_classes=2, dim=2, margin=0.2, scale=16)
    with torch.no_grad():
        head.loss.W.copy_(unit(0, 90).T)
    labels = torch.tensor([0, 1])
    assert head(unit(0, 90), None, labels) < head(unit(90, 0), None, labels)


def test_retrieval_metrics_by_hand():
    gallery = unit(0, 10, 90, 100)
    gallery_labels = torch.tensor([0, 0, 1, 1])
    query = unit(5, 95, 50)
    query_labels = torch.tensor([0, 1, 1])
    metrics = retrieval_metrics(query, query_labels, gallery, gallery_labels)
    # query 3 (50 deg) is nearest to 10 deg (class 0): wrong at rank 1, right at ranks 2 and 3
    assert metrics["top1"] == pytest.approx(2 / 3)
    assert metrics["top5"] == pytest.approx(1.0)
    # mAP@R with R = 2: queries 1-2 are perfect (1.0); query 3 ranks 10, 90, 100, 0 -> AP@2 = (0 + 1/2) / 2
    assert metrics["map_at_r"] == pytest.approx((1 + 1 + 0.25) / 3)


def test_map_at_r_matches_pytorch_metric_learning():
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    torch.manual_seed(1)
    gallery, query = F.normalize(torch.randn(60, 6), dim=1), F.normalize(torch.randn(30, 6), dim=1)
    gallery_labels, query_labels = torch.arange(60) % 6, torch.arange(30) % 6
    ours = retrieval_metrics(query, query_labels, gallery, gallery_labels)
    pml = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k=None).get_accuracy(
        query, query_labels, gallery, gallery_labels, ref_includes_query=False)
    assert ours["top1"] == pytest.approx(pml["precision_at_1"], abs=1e-6)
    assert ours["map_at_r"] == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-6)


def test_compatibility_matrix_and_bct_summary():
    labels = torch.tensor([0, 0, 1, 1])
    cloud = unit(0, 5, 90, 95)
    edge_good = unit(2, 3, 92, 93)  # lives in the cloud's space
    edge_alien = unit(180, 185, 270, 275)  # its own space: only self-consistent
    matrix = compatibility_matrix({"cloud": cloud, "good": edge_good, "alien": edge_alien}, labels,
                                  query_index=torch.tensor([1, 3]), gallery_index=torch.tensor([0, 2]))
    assert matrix["good"]["cloud"]["top1"] == 1.0
    assert matrix["alien"]["cloud"]["top1"] == 0.0 and matrix["alien"]["alien"]["top1"] == 1.0
    summary = summarise(matrix, "cloud", ["good", "alien"], {"good": 0.1, "alien": 0.1})
    assert summary["good"]["ratio_to_paragon"] == 1.0
    assert summary["alien"]["bct_criterion"] is False
