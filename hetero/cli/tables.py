"""Every console table the command prints: evaluation, search, verification, profiles and runtimes.

Each function builds a rich Table from a stage's report or records and the verbs print it; the stages
themselves (hetero.evaluate, hetero.verify, ...) only return data, so they never depend on the console.
hetero.verify is imported where a table needs it, not at the top: the command starts without torch.
"""
from __future__ import annotations

from rich.markup import escape
from rich.table import Table


# -------------------------------------------------------------------------------------------------- eval


def format_report(report: dict) -> Table:
    names = list(report["matrix"])
    table = Table(title=f"Compatibility matrix, top-1 / top-5 / mAP@R  ({escape(report['family'])}, "
                        f"{report['queries']} queries vs {report['gallery']} gallery, "
                        f"{report['test_classes']} unseen classes, chance {report['chance_top1']:.3f})")
    table.add_column("query \\ gallery")
    for g in names:
        table.add_column(g, justify="right")
    for q in names:
        row = report["matrix"][q]
        table.add_row(q, *(f"{row[g]['top1']:.3f} / {row[g]['top5']:.3f} / {row[g]['map_at_r']:.3f}" for g in names))
    return table


def format_edges(report: dict) -> Table:
    table = Table(title=f"Edge members against the {report['cloud']} gallery")
    for column in ("edge", "FLOPs vs cloud", "M[edge][cloud]", "M[edge][edge]", "ratio to paragon", "BCT"):
        table.add_column(escape(column), justify="right")
    for edge, row in report["edges"].items():
        table.add_row(edge, f"1/{1 / row['flops_vs_cloud']:.1f}", f"{row['edge_vs_cloud_top1']:.3f}",
                      f"{row['edge_vs_edge_top1']:.3f}", f"{row['ratio_to_paragon']:.3f}",
                      "pass" if row["bct_criterion"] else "FAIL")
    return table


def format_label_free(report: dict) -> Table:
    rows = report["label_free"]
    images = next(iter(rows.values()))["images"] if rows else 0
    table = Table(title=f"Without labels: edge queries against the {report['cloud']} gallery of {images} held-out "
                        f"images (each image's own row excluded)")
    recall = next((k for k in next(iter(rows.values()), {}) if k.startswith("recall_at_")), "recall_at_10")
    for column in ("edge", "top-1 agrees with the cloud's", f"recall@{recall.rsplit('_', 1)[1]} of the cloud's "
                   f"neighbours", "cosine to the cloud (mean)", "cosine, 5th percentile"):
        table.add_column(escape(column), justify="right")
    for edge, row in rows.items():
        table.add_row(edge, f"{row['agreement_top1']:.3f}", f"{row[recall]:.3f}", f"{row['cosine_mean']:.4f}",
                      f"{row['cosine_p05']:.4f}")
    return table


def format_backward(report: dict) -> Table:
    row = report["backward"]
    table = Table(title=f"Backward compatibility: new {report['cloud']} vs the old gallery of {row['old_cloud']}")
    for column in ("M[new][old]", "M[old][old]", "BCT (new > old)", "NFR vs old gallery", "NFR after re-index"):
        table.add_column(escape(column), justify="right")
    table.add_row(f"{row['new_vs_old_top1']:.3f}", f"{row['old_vs_old_top1']:.3f}",
                  "pass" if row["bct_criterion"] else "FAIL", f"{row['negative_flip_rate']:.3f}",
                  f"{row['negative_flip_rate_reindexed']:.3f}")
    return table


def format_early_exit(report: dict) -> Table:
    table = Table(title=f"Multi-exit members against the {report['cloud']} gallery (the rule: `hetero calibrate`)")
    for column in ("member", "answered by", "MFLOPs", "top-1 vs cloud", "share of queries"):
        table.add_column(escape(column), justify="right")
    for name, summary in report["early_exit"].items():
        rule = summary["rule"]
        for k, row in enumerate(summary["exits"]):
            share = f"{rule['shares'][k]:.3f}" if rule else "-"
            table.add_row(name, f"exit at stage {row['stage']}", f"{row['flops'] / 1e6:.2f}",
                          f"{row['top1_vs_cloud']:.3f}", share)
        if rule:
            table.add_row(name, "the rule (edge only)", f"{rule['mean_flops'] / 1e6:.2f} (mean)",
                          f"{rule['top1_edge']:.3f}", "")
            table.add_row(name, "escalated to the cloud", "", "", f"{rule['escalated']:.3f}")
            table.add_row(name, "the rule with the cloud", "", f"{rule['top1_system']:.3f}", "")
    return table


# ------------------------------------------------------------------------------------------------ verify


def format_verify(report: dict) -> Table:
    from hetero.verify.report import artifact_label

    table = Table(title=f"Verification of {len(report['artifacts'])} artifact(s) on {report['queries']} held-out "
                        f"queries vs {report['gallery']} cloud-gallery images ({escape(report['source'])})")
    for column in ("artifact", "check", "status", "detail"):
        table.add_column(column)
    for artifact in report["artifacts"]:
        for check in artifact["checks"]:
            style = {"pass": "green", "fail": "bold red", "skip": "yellow"}[check["status"]]
            table.add_row(escape(artifact_label(artifact)), check["name"], f"[{style}]{check['status']}[/]",
                          escape(check["detail"]))
    return table


def format_summary(report: dict) -> Table:
    from hetero.verify.report import summary_rows

    def num(value, fmt):
        return "-" if value is None else fmt.format(value)

    table = Table(title="Per artifact: cosine to torch, top-1 against the cloud gallery, latency, size")
    for column in ("profile", "member", "runtime", "min cos", "mean cos", "top-1", "torch top-1", "agree",
                   "latency ms", "MB", "status"):
        table.add_column(column, justify="right" if column not in ("profile", "member", "runtime") else "left")
    for row in summary_rows(report):
        status = "[green]pass[/]" if row["status"] == "pass" else "[bold red]FAIL[/]"
        if row["skipped"] and row["status"] == "pass":
            status += f" [yellow]({len(row['skipped'])} skipped)[/]"
        table.add_row(escape(row["profile"]), escape(row["member"]), escape(row["runtime"]),
                      num(row["min_cosine"], "{:.6f}"), num(row["mean_cosine"], "{:.6f}"), num(row["top1"], "{:.3f}"),
                      num(row["torch_top1"], "{:.3f}"), num(row["agreement"], "{:.1%}"),
                      num(row["latency_ms"], "{:.2f}"), num(row["size_mb"], "{:.2f}"), status)
    return table


# -------------------------------------------------------------------------------- search, profiles, runtimes


def format_search(store) -> Table:
    """The students `hetero search` wrote into the family, one row per edge member."""
    table = Table(title=f"students found for {escape(store.name)}")
    for column in ("member", "profile", "sub-network", "MFLOPs", "of the cloud", "latency ms", "validation top-1"):
        table.add_column(column)
    for m in store.edges:
        found = m.search or {}
        table.add_row(m.name, escape(found.get("profile", "")), found.get("candidate", ""), f"{m.flops / 1e6:.1f}",
                      f"{m.flops_vs_cloud:.4f}", f"{found.get('latency_ms', 0):.3f}",
                      f"{found.get('validation_top1', 0):.4f}")
    return table


def format_search_results(results: list[dict], model, location, k: int, show: int) -> Table:
    """The first `show` queries of a gallery search with their `k` neighbours."""
    table = Table(title=f"{len(results)} queries by {escape(model.label)} against {escape(str(location))}")
    chained = any("exit" in item for item in results)
    table.add_column("query")
    if chained:
        table.add_column("answered by")
    table.add_column(f"top {k} (score)")
    for item in results[: show]:
        found = "skipped (unreadable)" if item.get("skipped") else ", ".join(
            f"{r['name']} ({r['score']:.3f})" for r in item["results"])
        table.add_row(escape(item["query"]), *([item.get("exit", "-")] if chained else []), escape(found))
    return table


def format_profiles(profiles: list) -> Table:
    table = Table(title="Device profiles")
    for column in ("name", "format", "precision", "layout", "batch", "runtime", "description"):
        table.add_column(column)
    for p in profiles:
        table.add_row(p.name, p.format, p.precision, p.layout, str(p.batch or "dynamic"), escape(p.verify.runtime),
                      escape(p.description))
    return table


def format_runtimes(rows: list[dict], home) -> Table:
    """The isolated runtime environments in `home`."""
    table = Table(title=f"Runtime environments in {escape(str(home))}")
    for column in ("name", "package", "version", "python", "state", "created (s)"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["package"], row["version"], row["python"], escape(row["state"]),
                      f"{row['created']} ({row['create_seconds']:g} s)")
    return table
