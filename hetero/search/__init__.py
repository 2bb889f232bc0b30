"""Compatibility-aware student search (`hetero search`): one weight-sharing supernet, the best compatible
sub-network per device.

The supernet is the largest sub-network, an ordinary :class:`Embedder`.  A smaller sub-network keeps the
first channels of every layer (elastic width), the first blocks of every stage (elastic depth) and runs at
its own input size: its tensors are leading slices of the largest's, so training it trains them (Once-for-All,
Cai et al. 2020).  Each step trains the largest, the smallest and `sampled` random sub-networks (the sandwich
rule), or, with `schedule: progressive`, the same over a space that grows from input size to depth to width.

Two designs.  shared-cloud: the cloud member is the largest sub-network; it learns the classes and every
smaller one matches its (detached) embeddings, so each student literally shares the cloud's weights
("compatibility through architecture", Duggal et al. 2021).  frozen-cloud: a separate supernet matches a
frozen cloud, the one of a trained family (`search.cloud`).

Candidates are ranked on training classes kept out of the supernet's training (`validation_classes`), never
on test classes, after re-estimating each one's BatchNorm statistics: by default (`rank_by: neighbours`) by
the label-free recall of the cloud's own neighbours of those images, which does not saturate where the cloud
trained on those classes as M[candidate][cloud] top-1 there (`rank_by: top1`) does.  Their
latency is real: each candidate is exported for the target's profile and timed batch-1 by that profile's
runtime on this machine.  An evolutionary search (parents from the Pareto front of compatibility against
latency, one gene mutated per child) finds the best candidate under each target's budgets; the chosen ones
are extracted with their shared weights and written into the family manifest as ordinary members.

The rooms, top to bottom: stage (the command), selection (Pareto front, evolution, per-target choice),
scoring (figures and budgets), supernet (weight sharing and its training), space (candidates).
"""
from __future__ import annotations

from hetero.search.scoring import (BYTES_PER_WEIGHT, Scorer, latency_budget, measured_problems, no_candidate_message,
                                   static_problems, static_records, time_export)
from hetero.search.selection import check_runtime, evolve, feasible_pools, find_students, pareto_front
from hetero.search.space import Candidate, neighbours, progressive_space, sandwich, search_space
from hetero.search.stage import (CANDIDATES, SEARCH_DIR, fine_tune, given_cloud, pick_profile, search,
                                 write_search_results)
from hetero.search.supernet import (Supernet, Teacher, cached_teacher, layer_map, recalibrate, shared_classifier,
                                    sort_channels, supernet_loss, train_supernet)

__all__ = [
    "BYTES_PER_WEIGHT", "CANDIDATES", "SEARCH_DIR", "Candidate", "Scorer", "Supernet", "Teacher", "cached_teacher",
    "check_runtime",
    "evolve", "feasible_pools", "find_students", "fine_tune", "given_cloud", "latency_budget", "layer_map",
    "measured_problems", "neighbours", "no_candidate_message", "pareto_front", "pick_profile", "progressive_space",
    "recalibrate", "sandwich", "search", "search_space", "shared_classifier", "sort_channels", "static_problems",
    "static_records", "supernet_loss", "time_export", "train_supernet", "write_search_results",
]
