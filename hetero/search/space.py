"""The search space: a candidate sub-network (width, depth, input size), the space a config spans, the part
of it progressive shrinking opens at each epoch, the sandwich of picks trained per step, and a candidate's
one-gene neighbours (the evolutionary search's mutations)."""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Candidate:
    """One sub-network: width and depth multipliers of the supernet's architecture, and an input size."""

    width: float
    depth: float
    input_size: int

    @property
    def key(self) -> str:
        return f"w{self.width:g}-d{self.depth:g}-{self.input_size}px"


def search_space(settings) -> list[Candidate]:
    return sorted(Candidate(w, d, s) for w in set(settings.widths) for d in set(settings.depths)
                  for s in set(settings.input_sizes))


def progressive_space(space: list[Candidate], epoch: int, epochs: int) -> list[Candidate]:
    """Progressive shrinking's space at `epoch` (1-based): elastic input size first, then depth, then width."""
    largest = max(space)
    third = 3 * (epoch - 1) // epochs
    return [c for c in space if (third >= 2 or c.width == largest.width) and (third >= 1 or c.depth == largest.depth)]


def sandwich(allowed: list[Candidate], sampled: int, rng: random.Random) -> list[Candidate]:
    """The largest and the smallest sub-network (the space is a product, so both are in it), then `sampled`
    at random; each once."""
    picks = [max(allowed), min(allowed)] + [rng.choice(allowed) for _ in range(sampled)]
    return list(dict.fromkeys(picks))


def neighbours(candidate: Candidate, settings) -> list[Candidate]:
    """Candidates one step away along one gene (the next smaller or larger width, depth or input size)."""
    genes = {"width": sorted(set(settings.widths)), "depth": sorted(set(settings.depths)),
             "input_size": sorted(set(settings.input_sizes))}
    out = []
    for gene, values in genes.items():
        at = values.index(getattr(candidate, gene))
        for step in (-1, 1):
            if 0 <= at + step < len(values):
                out.append(dataclasses.replace(candidate, **{gene: values[at + step]}))
    return out
