"""Losses as small modules with one signature: ``loss(query, reference, labels) -> scalar``.

`query` holds one member's unit embeddings (an edge member's, for the cross-model terms), `reference`
the embeddings it must be compatible with (the cloud member's, of the same images in the same order), and
`labels` the class of each row.  Pair-based pieces come from pytorch-metric-learning, whose losses already
separate query embeddings from reference embeddings (the classifiers come from there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml
from torch import nn


class SharedClassifier(nn.Module):
    """Normalised-softmax classification through one set of class prototypes (CosFace or ArcFace).

    Shared by every member, it puts all members' embeddings around the same prototypes; frozen, it is BCT's
    influence loss.  The reference is not used: the prototypes are the reference.
    """

    def __init__(self, num_classes: int, dim: int, kind: str = "cosface", margin: float = 0.2, scale: float = 32.0):
        super().__init__()
        if kind == "arcface":
            self.loss = pml.ArcFaceLoss(num_classes, dim, margin=margin * 57.2958, scale=scale)
        else:
            self.loss = pml.CosFaceLoss(num_classes, dim, margin=margin, scale=scale)

    def forward(self, query: torch.Tensor, reference: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(query, labels)


class CrossContrastive(nn.Module):
    """Supervised contrastive loss of edge queries against cloud references (same class = positive).

    For each query, every reference of its class (its own image's cloud embedding included) is a positive
    and all references form the denominator, as in SupCon with the anchors and contrasts from two models.
    (pytorch-metric-learning 2.9's SupConLoss with ``ref_emb`` did not give this value on a hand-computed
    case, see tests/test_losses_metrics.py, so it is written out here.)
    """

    uses_labels = True

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature

    def forward(self, query, reference, labels):
        log_prob = F.log_softmax(query @ reference.T / self.temperature, dim=1)
        positives = (labels[:, None] == labels[None, :]).float()
        return (-(log_prob * positives).sum(dim=1) / positives.sum(dim=1)).mean()


class CosineRegression(nn.Module):
    """1 - cos(query_i, reference_i): pull each edge embedding onto the cloud embedding of its image."""

    uses_labels = False

    def forward(self, query, reference, labels):
        return (1 - (query * reference).sum(dim=1)).mean()


class L2Regression(nn.Module):
    """Squared distance between each edge embedding and the cloud embedding of the same image."""

    uses_labels = False

    def forward(self, query, reference, labels):
        return (query - reference).pow(2).sum(dim=1).mean()


class RelationalDistillation(nn.Module):
    """Contextual similarity distillation: each edge query keeps the cloud's similarity profile.

    Row i of softmax(query @ reference.T / t) must match row i of softmax(reference @ reference.T / t):
    the edge query ranks the cloud batch as the cloud's own embedding of that image does.
    """

    uses_labels = False

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature

    def forward(self, query, reference, labels):
        target = F.softmax(reference @ reference.T / self.temperature, dim=1)
        log_student = F.log_softmax(query @ reference.T / self.temperature, dim=1)
        return F.kl_div(log_student, target, reduction="batchmean")


CROSS_MODEL_LOSSES: dict[str, type[nn.Module]] = {
    "contrastive": CrossContrastive,
    "regression": CosineRegression,
    "l2": L2Regression,
    "relational": RelationalDistillation,
}


def build_cross_model_losses(weights: dict[str, float]) -> dict[str, tuple[float, nn.Module]]:
    return {name: (weight, CROSS_MODEL_LOSSES[name]()) for name, weight in weights.items() if weight > 0}
