"""Choosing the students: the Pareto front of compatibility against latency, the evolutionary search over
it, the checks made before anything is trained (a runtime here, a candidate within each target's static
budgets), and the best candidate per target."""
from __future__ import annotations

import logging
import random
import sys

from hetero import formats
from hetero.errors import ConfigError
from hetero.search.scoring import Scorer, measured_problems, no_candidate_message, static_problems
from hetero.search.space import Candidate, neighbours

# One logger for the whole stage, whichever room logs.
log = logging.getLogger("hetero.search")


def pareto_front(points: list[tuple[float, float, Candidate]]) -> list[tuple[float, float, Candidate]]:
    """(latency, figure, candidate) not dominated: nothing else is as fast and as good, and better in one."""
    front, best = [], -1.0
    for latency, top1, candidate in sorted(points, key=lambda p: (p[0], -p[1])):
        if top1 > best:
            front.append((latency, top1, candidate))
            best = top1
    return front


def evolve(pool: list[Candidate], evaluate, settings, rng: random.Random) -> list[Candidate]:
    """The candidates of `pool` an evolutionary search visits, up to `settings.evaluations`.

    evaluate(candidate) -> (latency, ranking figure) or None when it breaks a measured budget.  A random population
    first; then each child mutates one gene of a parent drawn from the Pareto front of what was visited.
    A pool no larger than the budget is visited whole.
    """
    if len(pool) <= settings.evaluations:
        for candidate in pool:
            evaluate(candidate)
        return list(pool)
    inside = set(pool)
    seen: dict[Candidate, tuple[float, float] | None] = {}
    for candidate in rng.sample(pool, min(settings.population, len(pool))):
        seen[candidate] = evaluate(candidate)
    while len(seen) < settings.evaluations:
        front = pareto_front([(*v, c) for c, v in seen.items() if v is not None]) or [(0, 0, c) for c in seen]
        parent = rng.choice(front)[2]
        children = [c for c in neighbours(parent, settings) if c in inside and c not in seen]
        child = rng.choice(children) if children else rng.choice([c for c in pool if c not in seen])
        seen[child] = evaluate(child)
    return list(seen)


def check_runtime(profile, target_name: str) -> None:
    """A target's profile must have its converter and runtime here: candidates are timed for real."""
    spec = formats.get(profile.format)
    missing = spec.missing_packages()
    where = f"search.targets {target_name!r}: profile {profile.name!r}"
    if missing:
        raise ConfigError(f"{where} times candidates with {profile.verify.runtime} on this machine, but {missing[0]} "
                          f"is not installed. Install it with: {spec.install_hint()}")
    host = {"darwin": "macos", "linux": "linux"}.get(sys.platform, sys.platform)
    if profile.verify.host not in ("any", host):
        raise ConfigError(f"{where} times candidates with {profile.verify.runtime}, which runs on "
                          f"{profile.verify.host} only (this machine: {host}); search for it on a {profile.verify.host} "
                          f"machine, or pick a profile whose runtime runs here")


def feasible_pools(records: dict[Candidate, dict], targets: list, profiles: dict) -> dict[str, list[Candidate]]:
    """Per target, the candidates within its static budgets (FLOPs, params, estimated file size); a target
    none meets is refused with the smallest figure the space reaches, before anything is trained."""
    pools = {}
    for target in targets:
        profile = profiles[target.name]
        problems = {c: static_problems(r, profile, target) for c, r in records.items()}
        pools[target.name] = [c for c, p in problems.items() if not p]
        if not pools[target.name]:
            order = [b for b in ("max_flops_vs_cloud", "max_mflops", "max_params", "max_file_mb")
                     if any(b in p for p in problems.values())]
            budget = next((b for b in order if all(b in p for p in problems.values())), order[0])
            raise ConfigError(no_candidate_message(target, profile, list(records.values()), budget))
    return pools


def find_students(scorer: Scorer, pools: dict[str, list[Candidate]], targets: list, profiles: dict, settings,
                  seed: int) -> dict[str, dict]:
    """Per target: the candidate of highest ranking figure (search.rank_by) that meets every budget, and what
    was visited."""
    chosen = {}
    for target in targets:
        profile, pool = profiles[target.name], pools[target.name]

        def evaluate(candidate: Candidate, profile=profile, target=target):
            measured = scorer.latency(candidate, profile)
            figure = scorer.rank(candidate)
            return None if measured_problems(measured, profile, target) else (measured["median_ms"], figure)

        visited = evolve(pool, evaluate, settings, random.Random(seed * 100_003 + len(chosen)))
        feasible = [c for c in visited if not measured_problems(scorer.latency(c, profile), profile, target)]
        if not feasible:
            broken = "latency" if any("latency" in measured_problems(scorer.latency(c, profile), profile, target)
                                      for c in visited) else "max_file_mb"
            raise ConfigError(no_candidate_message(target, profile, [scorer.record(c) for c in visited], broken))
        best = max(feasible, key=lambda c: (scorer.rank(c), -scorer.latency(c, profile)["median_ms"]))
        chosen[target.name] = {"target": target, "profile": profile, "candidate": best, "visited": visited}
        log.info("search %s: %s (%s %.4f, validation top-1 %.4f, %.3f ms on %s)", target.name, best.key,
                 scorer.rank_by, scorer.rank(best), scorer.top1(best), scorer.latency(best, profile)["median_ms"],
                 profile.name)
    return chosen
