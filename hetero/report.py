"""A verification report for people: console tables, JUnit XML, and Markdown or HTML with plots (PNG).

Plots: the distribution of each artifact's cosine to its torch member (as 1 - cosine, log scale, with the
profile's tolerance), top-1 against the cloud gallery per artifact next to the torch member's, and batch-1
latency per artifact next to the profile's target.  HTML embeds the PNGs (one self-contained file);
Markdown writes them beside the report in ``<name>_plots/``.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from hetero.files import atomic_path, atomic_write_text
from hetero.verify import CHECKS


# ------------------------------------------------------------------------------------------- console, JUnit


def artifact_label(artifact: dict) -> str:
    return f"{artifact['member']}@{artifact['profile']}" + (
        "" if artifact.get("runtime") in (None, "?") else f" ({artifact['runtime']})")


def summary_rows(report: dict) -> list[dict]:
    """One row per artifact: the figures people compare across profiles."""
    rows = []
    for a in report["artifacts"]:
        checks = {c["name"]: c for c in a["checks"]}
        v = {name: checks.get(name, {}).get("values", {}) for name in CHECKS}
        rows.append({
            "profile": a["profile"], "member": a["member"], "runtime": a["runtime"], "format": a["format"],
            "precision": a["precision"],
            "min_cosine": v["parity"].get("min_cosine"), "mean_cosine": v["parity"].get("mean_cosine"),
            "top1": v["retrieval"].get("runtime", {}).get("top1"),
            "torch_top1": v["retrieval"].get("torch", {}).get("top1"),
            "map_at_r": v["retrieval"].get("runtime", {}).get("map_at_r"),
            "agreement": v["retrieval"].get("top1_agreement"),
            "latency_ms": v["budget_latency"].get("median_ms"),
            "size_mb": v["budget_size"].get("value"),
            "status": "pass" if a["passed"] else "FAIL",
            "skipped": [c["name"] for c in a["checks"] if c["status"] == "skip"],
        })
    return rows


def format_verify(report: dict):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"Verification of {len(report['artifacts'])} artifact(s) on {report['queries']} held-out "
                        f"queries vs {report['gallery']} cloud-gallery images ({report['source']})")
    for column in ("artifact", "check", "status", "detail"):
        table.add_column(column)
    for artifact in report["artifacts"]:
        for check in artifact["checks"]:
            style = {"pass": "green", "fail": "bold red", "skip": "yellow"}[check["status"]]
            table.add_row(escape(artifact_label(artifact)), check["name"], f"[{style}]{check['status']}[/]",
                          escape(check["detail"]))
    return table


def format_summary(report: dict):
    from rich.markup import escape
    from rich.table import Table

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


def write_junit(report: dict, path: str | Path) -> None:
    """JUnit XML: one testsuite per artifact, one testcase per check (failure / skipped marked)."""
    import xml.etree.ElementTree as ET

    root = ET.Element("testsuites", name="hetero verify", tests=str(sum(report["counts"].values())),
                      failures=str(report["counts"]["fail"]), skipped=str(report["counts"]["skip"]),
                      errors="0", time=str(report.get("seconds", 0)))
    if not report["artifacts"]:
        suite = ET.SubElement(root, "testsuite", name="hetero.verify", tests="1", failures="1", skipped="0",
                              errors="0")
        case = ET.SubElement(suite, "testcase", classname="hetero.verify", name="artifacts_present")
        ET.SubElement(case, "failure", message="no exported artifacts to verify").text = \
            f"{report['source']}: the manifest lists no artifacts (run `hetero export` first)"
        root.set("tests", "1")
        root.set("failures", "1")
    for artifact in report["artifacts"]:
        checks = artifact["checks"]
        classname = f"hetero.verify.{artifact['profile']}.{artifact['member']}.{artifact['runtime']}"
        suite = ET.SubElement(root, "testsuite", name=artifact_label(artifact), tests=str(len(checks)),
                              failures=str(sum(c["status"] == "fail" for c in checks)),
                              skipped=str(sum(c["status"] == "skip" for c in checks)), errors="0")
        ET.SubElement(ET.SubElement(suite, "properties"), "property", name="file", value=artifact["file"])
        for check in checks:
            case = ET.SubElement(suite, "testcase", classname=classname, name=check["name"], time="0")
            if check["status"] == "fail":
                ET.SubElement(case, "failure", message=check["detail"][:500]).text = check["detail"]
            elif check["status"] == "skip":
                ET.SubElement(case, "skipped", message=check["detail"][:500])
            else:
                ET.SubElement(case, "system-out").text = check["detail"]
    tree = ET.ElementTree(root)
    ET.indent(tree)
    with atomic_path(path) as tmp:
        tree.write(tmp, encoding="utf-8", xml_declaration=True)


def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def plots(report: dict) -> dict[str, bytes]:
    """PNG bytes per plot name; plots without data are left out."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    out: dict[str, bytes] = {}
    with_cos = [a for a in report["artifacts"] if a.get("cosines")]
    if with_cos:
        columns = min(3, len(with_cos))
        rows = (len(with_cos) + columns - 1) // columns
        fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.8 * rows), squeeze=False)
        for ax, artifact in zip(axes.flat, with_cos):
            gap = np.clip(1.0 - np.asarray(artifact["cosines"], dtype=np.float64), 1e-9, None)
            ax.hist(np.log10(gap), bins=30, color="#3b7dd8")
            parity = next(c for c in artifact["checks"] if c["name"] == "parity")
            tolerance = parity.get("values", {}).get("tolerance")
            if tolerance is not None and tolerance < 1:
                ax.axvline(np.log10(1 - tolerance), color="#d83b3b", linestyle="--", label="tolerance")
                ax.legend(fontsize=7)
            ax.set_title(artifact_label(artifact), fontsize=8)
            ax.set_xlabel("log10(1 - cosine to torch)", fontsize=8)
            ax.set_ylabel("images", fontsize=8)
        for ax in list(axes.flat)[len(with_cos):]:
            ax.axis("off")
        fig.suptitle("Cosine to the torch member per held-out image (left is better)", fontsize=10)
        fig.tight_layout()
        out["cosine"] = _figure_png(fig)

    rows = summary_rows(report)
    labels = [f"{r['profile']}\n{r['member']} ({r['runtime']})" for r in rows]
    top1 = [(label, r) for label, r in zip(labels, rows) if r["top1"] is not None]
    if top1:
        fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(top1)), 3.4))
        x = np.arange(len(top1))
        ax.bar(x - 0.2, [r["torch_top1"] for _, r in top1], 0.4, label="torch member", color="#999999")
        ax.bar(x + 0.2, [r["top1"] for _, r in top1], 0.4, label="via runtime", color="#3b7dd8")
        ax.set_xticks(x, [label for label, _ in top1], fontsize=7, rotation=35, ha="right")
        ax.set_ylabel(f"top-1 vs {report.get('cloud', 'cloud')} gallery")
        ax.set_title("Retrieval against the cloud gallery: runtime vs torch")
        ax.legend(fontsize=8)
        fig.tight_layout()
        out["top1"] = _figure_png(fig)

    latency = [(label, r, a) for label, r, a in zip(labels, rows, report["artifacts"]) if r["latency_ms"] is not None]
    if latency:
        fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(latency)), 3.4))
        x = np.arange(len(latency))
        ax.bar(x, [r["latency_ms"] for _, r, _ in latency], 0.6, color="#3bd87d", label="median batch-1 latency")
        targets = [next(c for c in a["checks"] if c["name"] == "budget_latency")["values"].get("target_ms")
                   for _, _, a in latency]
        for i, target in enumerate(targets):
            if target is not None:
                ax.hlines(target, i - 0.35, i + 0.35, colors="#d83b3b", linestyles="--",
                          label="profile target" if i == 0 else None)
        ax.set_xticks(x, [label for label, _, _ in latency], fontsize=7, rotation=35, ha="right")
        ax.set_ylabel("ms (this CPU)")
        ax.set_yscale("log")
        ax.set_title("Latency, median of N batch-1 runs")
        ax.legend(fontsize=8)
        fig.tight_layout()
        out["latency"] = _figure_png(fig)
    return out


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _summary_table(report: dict) -> tuple[list[str], list[list[str]]]:
    head = ["profile", "member", "runtime", "min cos", "mean cos", "top-1", "torch top-1", "top-1 agreement",
            "latency ms", "size MB", "status"]
    body = []
    for r in summary_rows(report):
        status = r["status"] + (f" ({len(r['skipped'])} skipped)" if r["skipped"] else "")
        body.append([r["profile"], r["member"], r["runtime"], _fmt(r["min_cosine"], ".6f"),
                     _fmt(r["mean_cosine"], ".6f"), _fmt(r["top1"], ".3f"), _fmt(r["torch_top1"], ".3f"),
                     _fmt(r["agreement"], ".1%"), _fmt(r["latency_ms"], ".2f"), _fmt(r["size_mb"], ".2f"), status])
    return head, body


def _headline(report: dict) -> str:
    counts = report["counts"]
    verdict = "PASSED" if report["passed"] else "FAILED"
    return (f"{verdict}: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped checks over "
            f"{len(report['artifacts'])} artifact(s) of family {report['family']} (space {report['space_id']}); "
            f"{report['queries']} held-out queries vs {report['gallery']} cloud-gallery images; host "
            f"{report.get('host', '?')}; {report.get('seconds', 0):.1f} s")


def to_markdown(report: dict, images: dict[str, str]) -> str:
    def row(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    head, body = _summary_table(report)
    lines = [f"# hetero verify: {report['family']}", "", f"**{_headline(report)}**", "",
             f"Source: `{report['source']}`", "", "## Summary", "", row(head), row(["---"] * len(head))]
    lines += [row(cells) for cells in body]
    for name, title in (("cosine", "Cosine to torch"), ("top1", "Top-1 per artifact vs torch"),
                        ("latency", "Latency")):
        if name in images:
            lines += ["", f"## {title}", "", f"![{title}]({images[name]})"]
    lines += ["", "## Checks", "", row(["artifact", "check", "status", "detail"]), row(["---"] * 4)]
    for artifact in report["artifacts"]:
        for check in artifact["checks"]:
            status = {"fail": "**FAIL**", "skip": "skip", "pass": "pass"}[check["status"]]
            lines.append(row([artifact_label(artifact), check["name"], status, check["detail"]]))
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def to_html(report: dict, images: dict[str, str]) -> str:
    esc = html.escape
    head, body = _summary_table(report)
    colour = {"pass": "#1a7f37", "fail": "#cf222e", "skip": "#9a6700"}
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>hetero verify: {esc(report['family'])}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
        "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}"
        "th{background:#f3f3f3}img{max-width:100%;margin:1em 0}</style></head><body>",
        f"<h1>hetero verify: {esc(report['family'])}</h1>",
        f"<p style='color:{colour['pass' if report['passed'] else 'fail']}'><b>{esc(_headline(report))}</b></p>",
        f"<p>Source: <code>{esc(report['source'])}</code></p><h2>Summary</h2><table><tr>",
        "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>",
    ]
    for cells in body:
        parts.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    parts.append("</table>")
    for name, title in (("cosine", "Cosine to torch"), ("top1", "Top-1 per artifact vs torch"),
                        ("latency", "Latency")):
        if name in images:
            parts.append(f"<h2>{title}</h2><img alt='{title}' src='{images[name]}'>")
    parts.append("<h2>Checks</h2><table><tr><th>artifact</th><th>check</th><th>status</th><th>detail</th></tr>")
    for artifact in report["artifacts"]:
        for check in artifact["checks"]:
            parts.append(f"<tr><td>{esc(artifact_label(artifact))}</td><td>{esc(check['name'])}</td>"
                         f"<td style='color:{colour[check['status']]}'><b>{check['status']}</b></td>"
                         f"<td>{esc(check['detail'])}</td></tr>")
    parts.append("</table>")
    if report.get("notes"):
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in report["notes"]) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: dict, path: str | Path) -> Path:
    """Write the report as HTML (.html/.htm, PNGs embedded) or Markdown (anything else, PNGs beside it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pngs = plots(report)
    if path.suffix.lower() in (".html", ".htm"):
        images = {name: "data:image/png;base64," + base64.b64encode(data).decode() for name, data in pngs.items()}
        atomic_write_text(path, to_html(report, images))
    else:
        folder = path.with_name(path.stem + "_plots")
        folder.mkdir(exist_ok=True)
        images = {}
        for name, data in pngs.items():
            (folder / f"{name}.png").write_bytes(data)
            images[name] = f"{folder.name}/{name}.png"
        atomic_write_text(path, to_markdown(report, images))
    return path
