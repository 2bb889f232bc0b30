"""Retrieval metrics and the compatibility matrix over held-out classes.

M[q][g] is the retrieval quality when queries are embedded by member q and the gallery by member g.
The paragon is M[cloud][cloud]; an edge member is compatible when M[edge][cloud] comes close to it and
(BCT's criterion) beats M[edge][edge].
"""
from __future__ import annotations

import torch

from hetero.maths import (apply_rule, compatibility_matrix, correct_per_exit, label_free_figures, negative_flip_rate,
                          rule_figures, summarise, top1_correct)
from hetero.models import exit_embeddings, exit_entropies
from hetero.family import CompatibilityRecord, FamilyStore
from hetero.models import embed_images


def evaluate(store: FamilyStore) -> dict:
    """Evaluate a trained family: write DIR/report.json and the matrix into the manifest."""
    with store.lock("eval"):
        store.reload()
        split = store.split()
        models = {m.name: store.load_member(m.name) for m in store.members}
        cloud = store.cloud.name
        label_free = None
        if split.held_out is not None:  # unlabeled data: the held-out images, against the cloud's own answers
            held = split.held_out.floats()
            reference = embed_images(models[cloud], held)
            label_free = {m.name: label_free_figures(embed_images(models[m.name], held), reference)
                          for m in store.edges}
        if not split.labeled:
            report = {"family": store.name, "space_id": store.space_id, "cloud": cloud, "labeled": False,
                      "label_free": label_free, "skipped_images": store.manifest.data.skipped_images}
            store.write_json("report.json", report)
            return report
        images = split.test.floats()
        embeddings = {name: embed_images(model, images) for name, model in models.items()}
        exits = {m.name: exit_embeddings(models[m.name], images) for m in store.members if m.kind == "multi-exit"}
        for entry in store.members:  # each earlier exit is a row of its own: name@stage (the last is the member)
            for stage, exit_embedding in zip([e.stage for e in entry.exits or []][:-1], exits.get(entry.name, [])):
                embeddings[f"{entry.name}@{stage}"] = exit_embedding
        previous = store.manifest.previous
        if previous:  # a backward update: the old cloud's gallery is the one in service
            embeddings[OLD + previous.cloud] = embed_images(store.load_previous_cloud(), images)
        matrix = compatibility_matrix(embeddings, split.test.labels, split.query_index, split.gallery_index)
        report = {
            "family": store.name, "space_id": store.space_id, "compat": store.manifest.compat,
            "queries": len(split.query_index), "gallery": len(split.gallery_index),
            "test_classes": len(split.test.class_names),
            "chance_top1": 1.0 / len(split.test.class_names),
            "cloud": cloud, "matrix": matrix,
            "edges": summarise(matrix, cloud, [m.name for m in store.edges],
                               {m.name: m.flops_vs_cloud for m in store.members}),
            "skipped_images": store.manifest.data.skipped_images,
        }
        if label_free is not None:
            report["label_free"] = label_free
        if exits:
            report["early_exit"] = {name: early_exit_summary(store.member(name), models[name], found, embeddings[cloud],
                                                             split) for name, found in exits.items()}
        if previous:
            report["backward"] = backward_summary(embeddings, split, cloud, OLD + previous.cloud, matrix)
        store.write_json("report.json", report)
        store.record_compatibility(CompatibilityRecord(matrix=matrix, edges=report["edges"],
                                                       backward=report.get("backward")))
    return report


def early_exit_summary(entry, model, exits: torch.Tensor, cloud: torch.Tensor, split) -> dict:
    """Per exit: top-1 against the cloud gallery and FLOPs; with a calibrated rule, what it does on the test
    queries (top-1, mean edge FLOPs, shares per exit, share escalated, the system's top-1 with the cloud)."""
    q, g, labels = split.query_index, split.gallery_index, split.test.labels
    correct = correct_per_exit(exits[:, q], cloud[g], labels[q], labels[g])
    flops = [e.flops for e in entry.exits]
    summary = {"exits": [{"stage": e.stage, "flops": e.flops, "flops_vs_cloud": e.flops_vs_cloud,
                          "top1_vs_cloud": correct[k].float().mean().item()} for k, e in enumerate(entry.exits)],
               "rule": None}
    rule = (entry.early_exit or {}).get("rule")
    if rule is not None:
        entropies = exit_entropies(model, exits[:, q])
        cloud_correct = top1_correct(cloud[q], labels[q], cloud[g], labels[g])
        chosen = apply_rule(entropies, rule["thresholds"], rule["escalate_above"])
        summary["rule"] = {**rule_figures(chosen, correct, flops, cloud_correct),
                           "thresholds": rule["thresholds"], "escalate_above": rule["escalate_above"],
                           "cloud_top1": cloud_correct.float().mean().item()}
    return summary


OLD = "old:"  # prefix of the earlier family's cloud in a backward update's matrix


def backward_summary(embeddings: dict, split, new: str, old: str, matrix: dict) -> dict:
    """BCT's criterion M[new][old] > M[old][old] and the negative flip rate of the new cloud's queries.

    Flips are counted per held-out query against the old gallery (the gallery is never re-indexed) and,
    for reference, after a re-index (new queries against a new gallery).
    """
    q, g, labels = split.query_index, split.gallery_index, split.test.labels
    old_right = top1_correct(embeddings[old][q], labels[q], embeddings[old][g], labels[g])
    new_vs_old = top1_correct(embeddings[new][q], labels[q], embeddings[old][g], labels[g])
    new_vs_new = top1_correct(embeddings[new][q], labels[q], embeddings[new][g], labels[g])
    return {
        "old_cloud": old, "new_vs_old_top1": matrix[new][old]["top1"], "old_vs_old_top1": matrix[old][old]["top1"],
        "bct_criterion": matrix[new][old]["top1"] > matrix[old][old]["top1"],
        "negative_flip_rate": negative_flip_rate(old_right, new_vs_old),
        "negative_flip_rate_reindexed": negative_flip_rate(old_right, new_vs_new),
        "edges_vs_old_top1": {n: matrix[n][old]["top1"] for n in embeddings if n not in (new, old)},
    }

