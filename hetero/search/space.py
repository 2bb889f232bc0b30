"""The search space: a candidate sub-network (width, depth, input size, and for a mobilenet the expansion
ratio and the depthwise kernel size), the space a config spans, the part
of it progressive shrinking opens at each epoch, the sandwich of picks trained per step, and a candidate's
one-gene neighbours (the evolutionary search's mutations)."""
from __future__ import annotations

import dataclasses
import itertools
import random
from dataclasses import dataclass

from hetero.models import mobilenet_defaults


@dataclass(frozen=True, order=True)
class Candidate:
    """One sub-network: width and depth multipliers of the supernet's architecture, and an input size; for a
    mobilenet also the expansion ratio of every block past the first stage and the depthwise kernel size of
    every block (None for a resnet, which has neither)."""

    width: float
    depth: float
    input_size: int
    expand: float | None = None
    kernel: int | None = None

    @property
    def key(self) -> str:
        blocks = "" if self.expand is None else f"-e{self.expand:g}-k{self.kernel}"
        return f"w{self.width:g}-d{self.depth:g}-{self.input_size}px{blocks}"

    def blocks(self, arch: str) -> dict:
        """The member's per-block options (models.BLOCK_OPTIONS) that make it this candidate."""
        if arch != "mobilenet" or self.expand is None:
            return {}
        ratios, kernels = mobilenet_defaults(self.depth)
        # The first stage does not expand (ratio 1: no 1x1 expansion conv); every later block takes the gene.
        return {"expand_ratios": [r if r == 1 else self.expand for r in ratios],
                "kernel_sizes": [self.kernel] * len(kernels)}


def candidate_of(model) -> Candidate:
    """The candidate a member of the supernet's architecture is (an Embedder extracted or fine-tuned)."""
    blocks = getattr(model, "blocks", {})
    if "expand_ratios" not in blocks:
        return Candidate(model.width, model.depth, model.input_size)
    return Candidate(model.width, model.depth, model.input_size, max(blocks["expand_ratios"]),
                     blocks["kernel_sizes"][0])


def genes(settings) -> dict[str, list]:
    """Each gene's values, smallest first: width, depth, input size, and a mobilenet's expansion and kernel."""
    out = {"width": sorted(set(settings.widths)), "depth": sorted(set(settings.depths)),
           "input_size": sorted(set(settings.input_sizes))}
    if getattr(settings, "arch", "resnet") == "mobilenet":
        out |= {"expand": sorted(set(settings.expand_ratios)), "kernel": sorted(set(settings.kernel_sizes))}
    return out


def search_space(settings) -> list[Candidate]:
    values = genes(settings)
    return sorted(Candidate(**dict(zip(values, combination))) for combination in itertools.product(*values.values()))


def progressive_space(space: list[Candidate], epoch: int, epochs: int) -> list[Candidate]:
    """Progressive shrinking's space at `epoch` (1-based): elastic input size and kernel size first, then
    depth, then width and expansion (Once-for-All's order: kernel, depth, expansion)."""
    largest = max(space)
    third = 3 * (epoch - 1) // epochs
    return [c for c in space if (third >= 2 or (c.width, c.expand) == (largest.width, largest.expand))
            and (third >= 1 or c.depth == largest.depth)]


def sandwich(allowed: list[Candidate], sampled: int, rng: random.Random) -> list[Candidate]:
    """The largest and the smallest sub-network (the space is a product, so both are in it), then `sampled`
    at random; each once."""
    picks = [max(allowed), min(allowed)] + [rng.choice(allowed) for _ in range(sampled)]
    return list(dict.fromkeys(picks))


def neighbours(candidate: Candidate, settings) -> list[Candidate]:
    """Candidates one step away along one gene (the next smaller or larger value of one of `genes`)."""
    out = []
    for gene, values in genes(settings).items():
        at = values.index(getattr(candidate, gene))
        for step in (-1, 1):
            if 0 <= at + step < len(values):
                out.append(dataclasses.replace(candidate, **{gene: values[at + step]}))
    return out
