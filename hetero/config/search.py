"""The `search` section: what `hetero search` looks for (one student per target) and the supernet it
trains to find them."""
from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic.dataclasses import dataclass

from hetero.config.validation import STRICT, Positive, check_name
from hetero.latency import LATENCY_RUNS


@dataclass(config=STRICT)
class SearchTarget:
    """One student to find: the best sub-network under a device profile's budgets (and these tighter ones)."""

    name: str  # the member it becomes
    profile: str  # a built-in device profile or a profile .yaml; its runtime times the candidates
    max_flops_vs_cloud: Annotated[float, Field(gt=0, le=1)] | None = None
    max_latency_ms: Annotated[float, Field(gt=0)] | None = None  # tighter than the profile's target_latency_ms

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        return check_name(value, "member name")


@dataclass(config=STRICT)
class SearchConfig:
    """`hetero search`: one weight-sharing supernet of `arch`, whose sub-networks take every combination of
    `widths`, `depths` and `input_sizes` (multipliers and sizes as on a member; for a mobilenet also of
    `expand_ratios` and `kernel_sizes`), then the best compatible sub-network per target, ranked (`rank_by`)
    on training classes held out of the supernet's training.

    shared-cloud: the cloud member is the largest sub-network, so every student shares the cloud's weights
    (the largest width, depth and input size must be the cloud's); it learns the classes, the smaller ones
    match it.  frozen-cloud: a separate supernet learns to match a frozen cloud (the config's cloud trained
    first on the same classes, or the cloud of the family in `cloud`).
    """

    targets: Annotated[list[SearchTarget], Field(min_length=1)]
    # frozen-cloud: the supernet matches a trained family's frozen cloud, which stays as it is with its
    # galleries (the default: it measured better in benchmarks/student_search.py); shared-cloud: the cloud
    # is the largest sub-network and trains with the others.
    design: Literal["frozen-cloud", "shared-cloud"] = "frozen-cloud"
    # A trained family: frozen-cloud, its cloud is the teacher; shared-cloud, the supernet starts from it.
    cloud: str | None = None
    # The supernet's architecture (hetero's own): resnet, or mobilenet (what phones run), whose sub-networks
    # also vary in expansion ratio and depthwise kernel size (Once-for-All's elastic expand and kernel).
    arch: Literal["resnet", "mobilenet"] = "resnet"
    widths: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1)] = field(
        default_factory=lambda: [0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0])
    depths: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1)] = field(
        default_factory=lambda: [0.5, 1.0])
    input_sizes: Annotated[list[Annotated[int, Field(ge=16, le=1024)]], Field(min_length=1)] = field(
        default_factory=lambda: [32, 40, 48, 56, 64])
    # mobilenet only: the expansion ratios a sub-network may give every block past the first stage (whose
    # blocks keep ratio 1); a smaller ratio keeps the leading, importance-sorted hidden channels of each block.
    # Not given: [4], the registry mobilenet's own.
    expand_ratios: list[Annotated[float, Field(gt=1, le=16)]] | None = None
    # mobilenet only: the depthwise kernel sizes a sub-network may give every block; a smaller kernel is the
    # centre of the largest.  Not given: [3].
    kernel_sizes: list[Literal[3, 5, 7]] | None = None
    epochs: Positive = 10
    # The sandwich rule: each step trains the largest and the smallest sub-network plus this many at random.
    # progressive: the same, but the sampled space grows over the epochs (input size, then depth, then width).
    sampled: Annotated[int, Field(ge=0)] = 2
    schedule: Literal["sandwich", "progressive"] = "sandwich"
    # Share of the training classes kept out of the supernet's training to rank the candidates on.
    validation_classes: Annotated[float, Field(gt=0, lt=1)] = 0.2
    # What ranks the candidates, on the validation images (every visited candidate's figures are recorded):
    # neighbours: label-free agreement with the cloud, the share of the cloud's own 10 nearest neighbours of
    #   each validation image that the candidate's query finds among its 10 nearest in the cloud's gallery;
    #   it compares fine orderings, so it does not saturate on classes the cloud trained on;
    # top1: M[candidate][cloud] top-1 on the validation classes (their first images the cloud's gallery),
    #   which saturates (0.93-0.98) when the cloud trained on those classes, as a family's cloud has.
    rank_by: Literal["neighbours", "top1"] = "neighbours"
    # Sub-networks the evolutionary search evaluates per target (every one when the space is no larger).
    evaluations: Positive = 48
    population: Annotated[int, Field(ge=2)] = 12
    bn_images: Positive = 512  # training images that re-estimate a sub-network's BatchNorm statistics
    # Timed batch-1 runs per candidate (median, after 5 warm-up runs): the protocol `hetero verify` times the
    # exported students with (hetero.latency), so a student chosen for a latency budget meets it there.
    latency_runs: Positive = LATENCY_RUNS
    # Each chosen student then trains alone against the cloud this many epochs: the edge phase of `hetero train`
    # on every training image, through the teacher cache (train.teacher_cache, or its default views).
    fine_tune_epochs: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _consistent(self):
        names = [t.name for t in self.targets]
        if len(set(names)) < len(names):
            raise ValueError(f"targets: member names must be unique, got {names}")
        for gene in ("expand_ratios", "kernel_sizes"):
            values = getattr(self, gene)
            if self.arch != "mobilenet" and values is not None:
                raise ValueError(f"{gene}: genes of a mobilenet supernet (arch: mobilenet); arch {self.arch!r} "
                                 f"has none (got {values})")
            if values is not None and not values:
                raise ValueError(f"{gene}: give at least one value")
        if self.arch == "mobilenet":
            self.expand_ratios = self.expand_ratios or [4.0]
            self.kernel_sizes = self.kernel_sizes or [3]
        genes = [self.widths, self.depths, self.input_sizes, self.expand_ratios or [0], self.kernel_sizes or [0]]
        if all(len(set(values)) == 1 for values in genes):
            raise ValueError("widths, depths, input_sizes: the search space has a single candidate "
                             f"(width {self.widths[0]}, depth {self.depths[0]}, {self.input_sizes[0]} px); give "
                             "more than one value for at least one of them")
        return self
