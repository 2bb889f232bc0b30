"""Exit chains: a multi-exit artifact is checked exit by exit, and its chained run against torch's choices."""
from __future__ import annotations

from pathlib import Path

import torch

from hetero import formats
from hetero.errors import ExportError, ManifestError, RuntimeUnavailable
from hetero.export.common import EXIT_AGREEMENT, chain_exit_agreement
from hetero.family import ArtifactRecord, FamilyStore
from hetero.files import path_bytes
from hetero.maths import retrieval_metrics
from hetero.models import resize_to
from hetero.runtimes import RuntimeEnvError, WorkerFailed
from hetero.verify.checks import check_latency, check_space_identity, check_static_budgets, weights_problem
from hetero.verify.reference import Reference
from hetero.verify.results import CHECKS, ArtifactResult


def check_exit_chain(result: ArtifactResult, reference: Reference, artifact: ArtifactRecord, path: Path, sha: str,
                     profile, target, latency_runs: int) -> None:
    """A multi-exit artifact: the chain's files are the ones exported together; every exit keeps parity and
    retrieval against the cloud gallery; the chained run, stage by stage with the calibrated rule, picks the
    exit torch picks for >= 99% of queries."""
    spec = formats.get(artifact.format)
    try:
        chain = target.open_chain(spec, path)
    except RuntimeUnavailable as err:
        raise result.stop("identity", "skip", f"sha256 matches the manifest; the chain was not run: {err}",
                          f"skipped: {err}") from None
    except (WorkerFailed, RuntimeEnvError) as err:
        raise result.stop("identity", "fail", f"{artifact.file}: cannot open with {target.label}: {err}",
                          "not run: artifact cannot be opened") from None
    except ExportError as err:
        raise result.stop("identity", "fail", str(err), "not run: the chain's files were not exported together") \
            from None
    try:
        _check_chain(result, reference, artifact, chain, path, sha, profile, target, latency_runs)
    finally:
        chain.close()


def _check_chain(result: ArtifactResult, reference: Reference, artifact: ArtifactRecord, chain, path: Path,
                 sha: str, profile, target, latency_runs: int) -> None:
    from hetero.models import exit_embeddings

    check_space_identity(result, reference, artifact, chain.metadata, sha)
    try:
        model = FamilyStore.open(reference.root).load_member(artifact.member)
    except ManifestError as err:
        raise result.stop("structure", "skip", f"the torch member is not at hand ({err})",
                          "skipped: multi-exit artifacts are checked from their family directory") from None
    if chain.unavailable:
        return _structure_only(result, reference, artifact, chain, path, profile, model)
    floats = resize_to(reference.query_floats(), model.input_size)
    ours, ours_entropy = (torch.from_numpy(a) for a in chain.exits(floats.numpy()))
    theirs = exit_embeddings(model, floats)
    stages = list(model.exits)
    shape_ok = tuple(ours.shape) == (len(floats), len(stages), model.dim)
    norms = ours.norm(dim=2) if shape_ok else torch.zeros(1)
    result.add("structure", "pass" if shape_ok and (norms - 1).abs().max() < 1e-3 else "fail",
               f"{len(stages)} exits (stages {', '.join(map(str, stages))}) + {len(chain.stages)} chained stage graphs; "
               f"all-exits graph gives {tuple(ours.shape)}, unit vectors (max |norm - 1| "
               f"{(norms - 1).abs().max().item():.2e})")
    if not shape_ok:
        raise result.stop("parity", "skip", "not run: the structure check failed", "not run: structure failed")
    tolerance = profile.tolerances
    cosines = [torch.nn.functional.cosine_similarity(ours[:, k], theirs[k], dim=1) for k in range(len(stages))]
    result.cosines = [round(float(c), 10) for c in cosines[-1]]
    low = [c.min().item() for c in cosines]
    rule = (chain.metadata.get("early_exit") or {}).get("rule")
    agreement_note, agreement = "no calibrated rule in the artifact (run `hetero calibrate`, then export): the " \
                                "chained run was not checked", None
    if rule is not None:
        agreement, shares = chain_exit_agreement(chain, model, floats, rule)
        agreement_note = (f"chained run stage by stage with the calibrated rule: the exit chosen equals torch's for "
                          f"{agreement:.1%} of {len(floats)} queries (needed {EXIT_AGREEMENT:.0%}); shares per exit "
                          f"{' / '.join(f'{x:.2f}' for x in shares[:-1])}, to the cloud {shares[-1]:.2f}")
    passed = min(low) >= tolerance.min_cosine and (agreement is None or agreement >= EXIT_AGREEMENT)
    result.add("parity", "pass" if passed else "fail",
               "cosine to torch per exit, min: " + ", ".join(f"stage {s} {c:.6f}" for s, c in zip(stages, low)) +
               f" (tolerance {tolerance.min_cosine}); {agreement_note}",
               min_cosine=min(low), per_exit_min_cosine=low, exit_agreement=agreement)
    rows, problems = [], []
    for k, stage in enumerate(stages):
        via_runtime = retrieval_metrics(ours[:, k], reference.query_labels, reference.gallery, reference.gallery_labels)
        via_torch = retrieval_metrics(theirs[k], reference.query_labels, reference.gallery, reference.gallery_labels)
        drop = via_torch["top1"] - via_runtime["top1"]
        rows.append({"stage": stage, "runtime": via_runtime, "torch": via_torch, "top1_drop": drop})
        if drop > tolerance.max_top1_drop:
            problems.append(f"exit at stage {stage}: top-1 drop {drop:+.4f} exceeds the allowed {tolerance.max_top1_drop}")
    result.add("retrieval", "fail" if problems else "pass",
               "; ".join(problems) + ("; " if problems else "") + f"M[exit via {target.label}][{reference.cloud}] top-1 "
               "per exit: " + ", ".join(f"stage {r['stage']} {r['runtime']['top1']:.4f} (torch "
                                        f"{r['torch']['top1']:.4f})" for r in rows), exits=rows)
    check_latency(result, chain, floats[:1].numpy(), profile.budgets.target_latency_ms, latency_runs)
    check_static_budgets(result, reference.members[artifact.member], profile, path_bytes(path))
    result.checks.sort(key=lambda c: CHECKS.index(c.name))


def _structure_only(result: ArtifactResult, reference: Reference, artifact: ArtifactRecord, chain, path: Path,
                    profile, model) -> None:
    """A chain that cannot run on this host (CoreML off macOS): each graph's spec against what the chain needs
    (stage k's features in are stage k-1's features out, every exit a vector of the family dimension, the
    weights in the profile's precision); the numeric checks are skipped, saying the run was not checked."""
    problems = chain_structure_problems(chain.graphs(), len(model.exits), model.dim, model.input_size,
                                        chain.metadata.get("layout", "NCHW"), profile.precision)
    graphs = chain.graphs()
    result.add("structure", "fail" if problems else "pass",
               "; ".join(problems) or f"{len(graphs) - 1} chained stage graphs + all-exits graph, spec read on "
                                      f"this host: " + "; ".join(f"{name}: in {facts['inputs']}, out "
                                                                  f"{facts['outputs']}" for name, facts in graphs),
               graphs={name: {k: v for k, v in facts.items() if k != "metadata"} for name, facts in graphs})
    why = (f"skipped: the chain's run (every exit's cosine to torch and retrieval, and the run stage by stage with "
           f"the calibrated rule) was not checked on this host: {chain.unavailable}")
    for name in ("parity", "retrieval", "budget_latency"):
        result.add(name, "skip", why, needs_platform=chain.platform)
    check_static_budgets(result, reference.members[artifact.member], profile, path_bytes(path))
    result.checks.sort(key=lambda c: CHECKS.index(c.name))


def chain_structure_problems(graphs: list[tuple[str, dict]], exits: int, dim: int, size: int, layout: str,
                             precision: str) -> list[str]:
    """What is wrong with a chain's graphs read from their specs: (file name, facts) per stage, then the
    all-exits graph; facts as `inspect_artifact` gives them (inputs and outputs by name with shapes, weight
    elements per dtype).  Empty when nothing."""
    problems = []
    *stages, (all_name, all_facts) = graphs
    if len(stages) != exits:
        problems.append(f"{len(stages)} stage graphs for {exits} exits")
    images = [3, size, size] if layout == "NCHW" else [size, size, 3]
    previous = None  # the features shape the previous stage gives
    for index, (name, facts) in enumerate(stages):
        inputs, outputs = facts.get("inputs", {}), facts.get("outputs", {})
        wanted = ["embedding", "entropy"] + (["next_features"] if index < len(stages) - 1 else [])
        if list(outputs) != wanted:
            problems.append(f"{name}: outputs {list(outputs)}, expected {wanted}")
        if len(inputs) != 1:
            problems.append(f"{name}: expected one input, found {list(inputs)}")
            continue
        (given, shape), = inputs.items()
        if index == 0 and shape and list(shape[1:]) != images:
            expected = ", ".join(map(str, images))
            problems.append(f"{name}: input {given!r} has shape {shape}, expected (batch, {expected}) for layout "
                            f"{layout}")
        if index > 0 and previous and shape and list(shape) != list(previous):
            problems.append(f"{name}: input {given!r} has shape {shape}, but the stage before gives features "
                            f"{previous}")
        embedding = outputs.get("embedding")
        if embedding and embedding[-1] != dim:
            problems.append(f"{name}: embedding has shape {embedding}, expected last dimension {dim}")
        previous = outputs.get("next_features")
    outputs = all_facts.get("outputs", {})
    if list(outputs) != ["embeddings", "entropies"]:
        problems.append(f"{all_name}: outputs {list(outputs)}, expected ['embeddings', 'entropies']")
    elif outputs["embeddings"] and list(outputs["embeddings"][1:]) != [exits, dim]:
        problems.append(f"{all_name}: embeddings have shape {outputs['embeddings']}, expected (batch, {exits}, {dim})")
    problems += [f"{name}: {problem}" for name, facts in graphs if (problem := weights_problem(facts, precision))]
    return problems
