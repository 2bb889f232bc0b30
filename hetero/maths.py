"""Retrieval metrics and the early-exit rule's arithmetic: pure functions of tensors, on the ground floor.

M[q][g] is the retrieval quality when queries are embedded by member q and the gallery by member g.  The
exit rule: at exit k a query stops when its entropy is at most threshold k; the last edge exit answers
unless the rule escalates to the cloud.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def retrieval_metrics(query: torch.Tensor, query_labels: torch.Tensor, gallery: torch.Tensor,
                      gallery_labels: torch.Tensor) -> dict[str, float]:
    """top-1, top-5 (a correct item among the 5 nearest) and mAP@R of unit-vector queries vs a gallery."""
    similarity = query @ gallery.T
    k = min(max(5, int(torch.bincount(gallery_labels).max())), gallery.shape[0])
    order = similarity.topk(k, dim=1).indices
    hits = gallery_labels[order] == query_labels[:, None]  # queries x k
    relevant = (gallery_labels[None, :] == query_labels[:, None]).sum(dim=1)  # R per query
    ranks = torch.arange(1, k + 1, dtype=torch.float32)
    within_r = ranks[None, :] <= relevant[:, None]
    precision_at_i = hits.float().cumsum(dim=1) / ranks
    average_precision = (precision_at_i * hits * within_r).sum(dim=1) / relevant.clamp_min(1)
    return {
        "top1": hits[:, 0].float().mean().item(),
        "top5": hits[:, :5].any(dim=1).float().mean().item(),
        "map_at_r": average_precision.mean().item(),
    }


def top1_correct(query: torch.Tensor, query_labels: torch.Tensor, gallery: torch.Tensor,
                 gallery_labels: torch.Tensor) -> torch.Tensor:
    """Per query: whether its nearest gallery item has its class."""
    return gallery_labels[(query @ gallery.T).argmax(dim=1)] == query_labels


def negative_flip_rate(old_correct: torch.Tensor, new_correct: torch.Tensor) -> float:
    """Share of queries the old model answered right and the new one gets wrong (the update's regressions)."""
    return (old_correct & ~new_correct).float().mean().item()


def compatibility_matrix(embeddings: dict[str, torch.Tensor], labels: torch.Tensor, query_index: torch.Tensor,
                         gallery_index: torch.Tensor) -> dict[str, dict[str, dict[str, float]]]:
    """M[query member][gallery member] from each member's embeddings of the same test images."""
    return {
        q: {
            g: retrieval_metrics(embeddings[q][query_index], labels[query_index],
                                 embeddings[g][gallery_index], labels[gallery_index])
            for g in embeddings
        }
        for q in embeddings
    }


def label_free_figures(query: torch.Tensor, cloud: torch.Tensor, k: int = 10) -> dict[str, float]:
    """How far an edge member's queries behave like the cloud's own, on held-out images without labels.

    The gallery is the cloud's embeddings of the held-out images; each image's own row is excluded from its
    search.  agreement: the edge query's top-1 is the cloud query's top-1; recall_at_k: the share of the
    cloud's k nearest neighbours the edge query finds among its own k; cosine: edge and cloud embeddings of
    the same image (mean and 5th percentile).
    """
    k = min(k, len(cloud) - 1)
    own = torch.eye(len(cloud), dtype=torch.bool)
    via_edge = (query @ cloud.T).masked_fill(own, -2.0).topk(k, dim=1).indices
    via_cloud = (cloud @ cloud.T).masked_fill(own, -2.0).topk(k, dim=1).indices
    shared = (via_edge[:, :, None] == via_cloud[:, None, :]).any(dim=2).float().sum(dim=1)
    cosine = (query * cloud).sum(dim=1)
    return {"agreement_top1": (via_edge[:, 0] == via_cloud[:, 0]).float().mean().item(),
            f"recall_at_{k}": (shared / k).mean().item(), "cosine_mean": cosine.mean().item(),
            "cosine_p05": cosine.quantile(0.05).item(), "images": len(cloud)}


def summarise(matrix: dict, cloud: str, edges: list[str], flops_ratio: dict[str, float]) -> dict[str, dict]:
    """Per edge member: ratio of M[edge][cloud] to the paragon and the BCT criterion."""
    paragon = matrix[cloud][cloud]["top1"]
    return {
        edge: {
            "edge_vs_cloud_top1": matrix[edge][cloud]["top1"],
            "edge_vs_edge_top1": matrix[edge][edge]["top1"],
            "ratio_to_paragon": matrix[edge][cloud]["top1"] / paragon if paragon else 0.0,
            "bct_criterion": matrix[edge][cloud]["top1"] > matrix[edge][edge]["top1"],
            "flops_vs_cloud": flops_ratio[edge],
        }
        for edge in edges
    }


def spherical_kmeans(points: torch.Tensor, k: int, iterations: int = 25) -> torch.Tensor:
    """k unit centres of unit vectors (deterministic: starts from evenly spaced points)."""
    k = min(k, len(points))
    centres = points[torch.linspace(0, len(points) - 1, k).round().long()].clone()
    for _ in range(iterations):
        assign = (points @ centres.T).argmax(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, assign, points)
        empty = sums.norm(dim=1) == 0
        centres = torch.where(empty[:, None], centres, F.normalize(sums, dim=1))
    return centres


def apply_rule(entropies: torch.Tensor, thresholds: list[float], escalate_above: float | None = None
               ) -> torch.Tensor:
    """Per query, the exit that answers (0-based), or len(exits) when it goes to the cloud."""
    exits = entropies.shape[0]
    chosen = torch.full((entropies.shape[1],), exits - 1, dtype=torch.long)
    undecided = torch.ones(entropies.shape[1], dtype=torch.bool)
    for k, threshold in enumerate(thresholds):
        stop = undecided & (entropies[k] <= threshold)
        chosen[stop] = k
        undecided &= ~stop
    if escalate_above is not None:
        chosen[undecided & (entropies[-1] > escalate_above)] = exits
    return chosen


def escalation_threshold(reaching: torch.Tensor, queries: int, share: float) -> float | None:
    """The unsureness (last-exit entropy, or minus the gallery margin) above which `share` of `queries` go to
    the cloud, from that of the queries that reached the last exit (`reaching`): halfway between the least
    sure query kept and the surest one sent; None when the share rounds to no query."""
    count = min(len(reaching), int(round(share * queries)))
    if count == 0:
        return None
    ordered = reaching.sort(descending=True).values
    return float(ordered[count - 1: count + 1].mean()) if count < len(ordered) else float(ordered[-1]) - 1.0


class EscalationBudget:
    """Sends about `share` of the queries to the cloud, whatever the queries are like.

    A threshold fitted once (the calibrated `escalate_above`) sends the asked share of queries like the
    calibration's; queries of new classes are less sure, so it sends more of them (on Omniglot's new alphabets
    about three times the share asked, benchmarks/early_exit.py).  Here the threshold on a query's
    unsureness (the last exit's entropy, or minus its gallery margin) starts at the calibrated one, or without
    one is fitted on the first batch, and after each batch is fitted again to the last `window` queries seen
    (those that stopped at an earlier exit count as kept): each batch is decided by the queries before it, as
    a stream is.
    """

    def __init__(self, share: float, start_above: float | None, window: int = 1000):
        if not 0 < share < 1:
            raise ValueError(f"the share of queries escalated must be in (0, 1), got {share}")
        if window < 1:
            raise ValueError(f"the escalation window must hold at least 1 query, got {window}")
        self.share, self.above, self.window = share, start_above, window
        self.seen = torch.empty(0)  # unsureness per recent query; -inf where it stopped earlier

    def __call__(self, unsure: torch.Tensor) -> torch.Tensor:
        """Per query of a batch (its unsureness at the last exit, NaN where it stopped earlier): whether it
        goes to the cloud."""
        reached = ~unsure.isnan()
        scores = torch.where(reached, unsure.float(), -torch.inf)
        if self.above is None and len(self.seen) == 0:
            self.above = escalation_threshold(scores[reached], len(scores), self.share)
        sent = reached & (unsure > self.above) if self.above is not None else torch.zeros_like(reached)
        self.seen = torch.cat([self.seen, scores])[-self.window:]
        self.above = escalation_threshold(self.seen[self.seen > -torch.inf], len(self.seen), self.share)
        return sent


def gallery_margin(scores: torch.Tensor, same_class: torch.Tensor) -> torch.Tensor:
    """Per query, how sure its gallery answer is: the similarity to its nearest item minus that to the nearest
    item of another class, from its neighbours' `scores` (queries x K, best first; -inf pads) and whether each
    is of the nearest item's class.  Where all K are of one class, the margin is at least the first minus the
    last of them, which is what is returned."""
    other = scores.masked_fill(same_class, -torch.inf).max(dim=1).values
    found = scores.masked_fill(scores == -torch.inf, torch.inf).min(dim=1).values
    return scores[:, 0] - torch.where(other > -torch.inf, other, found)


def rule_figures(chosen: torch.Tensor, correct: torch.Tensor, flops: list[int], cloud_correct=None) -> dict:
    """top-1 of the edge answers (escalated queries answered by the last exit), mean edge FLOPs, shares per
    exit and to the cloud, and with `cloud_correct` the whole system's top-1 (escalated ones by the cloud)."""
    exits = len(flops)
    edge_exit = chosen.clamp(max=exits - 1)
    answered = correct[edge_exit, torch.arange(len(chosen))]
    escalated = chosen == exits
    figures = {"top1_edge": answered.float().mean().item(),
               "mean_flops": torch.tensor(flops, dtype=torch.float64)[edge_exit].mean().item(),
               "shares": [(chosen == k).float().mean().item() for k in range(exits)],
               "escalated": escalated.float().mean().item()}
    if cloud_correct is not None:
        figures["top1_system"] = torch.where(escalated, cloud_correct, answered).float().mean().item()
    return figures


def correct_per_exit(queries: torch.Tensor, gallery: torch.Tensor, query_labels, gallery_labels,
                     agreement_with=None) -> torch.Tensor:
    """exits x queries: whether each exit's nearest gallery item is right (its label, or without labels the
    item the cloud's own query finds: `agreement_with`, the cloud's embeddings of the queries)."""
    if agreement_with is not None:
        truth = (agreement_with @ gallery.T).argmax(dim=1)
        return torch.stack([(q @ gallery.T).argmax(dim=1) == truth for q in queries])
    return torch.stack([gallery_labels[(q @ gallery.T).argmax(dim=1)] == query_labels for q in queries])
