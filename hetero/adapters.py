"""compat: adapter, the post-hoc baseline: a linear map from an independently trained member's embedding space
into the cloud's, fitted on images without labels (the same images embedded by both).

Two maps: orthogonal Procrustes (a rotation, which keeps the member's own geometry) and a least-squares affine
map, optionally of low rank (reduced-rank regression).  Either becomes a Linear layer (then L2 normalisation)
at the end of the member's graph, so exported files carry it.
"""
from __future__ import annotations

import torch


def fit_procrustes(source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the rotation R minimising ||source R - target||: R = U V^T from svd(source^T target)."""
    u, _, vh = torch.linalg.svd(source.double().T @ target.double())
    rotation = u @ vh
    return rotation.T.float(), torch.zeros(source.shape[1])


def fit_affine(source: torch.Tensor, target: torch.Tensor, rank: int | None = None, ridge: float = 1e-4
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the least-squares map source B + c ~ target, B of rank <= `rank` when given.

    A small ridge keeps it stable when the source space is degenerate; the low-rank map is reduced-rank
    regression (the least-squares fit projected on the top singular directions of its own predictions).
    """
    x, y = source.double(), target.double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    x0, y0 = x - x_mean, y - y_mean
    gram = x0.T @ x0 + ridge * len(x0) * torch.eye(x0.shape[1], dtype=x0.dtype)
    b = torch.linalg.solve(gram, x0.T @ y0)
    if rank is not None and rank < min(b.shape):
        _, _, vh = torch.linalg.svd(x0 @ b, full_matrices=False)
        top = vh[:rank].T
        b = b @ top @ top.T
    bias = y_mean - x_mean @ b
    return b.T.float(), bias.float()


def fit_adapter(source: torch.Tensor, target: torch.Tensor, kind: str, rank: int | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "procrustes":
        return fit_procrustes(source, target)
    return fit_affine(source, target, rank)
