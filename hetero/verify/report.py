"""A verification report for people: JUnit XML, and Markdown or HTML with plots (PNG).

Plots show what matters at a glance: each run's drop from the torch member (points of top-1, and 1 - min
cosine on a log scale) and its latency, one row per profile / member / runtime version, with the profile's
tolerance or target drawn on each row.  HTML embeds the PNGs (one self-contained file); Markdown writes
them beside the report in ``<name>_plots/``.  The console tables, built from the same summary rows, are the
command's (:mod:`hetero.cli.tables`).
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from hetero.files import atomic_path, atomic_write_text
from hetero.verify.results import CHECKS


# ---------------------------------------------------------------------------------- summary rows, JUnit


def artifact_label(artifact: dict) -> str:
    return f"{artifact['member']}@{artifact['profile']}" + (
        "" if artifact.get("runtime") in (None, "?") else f" ({artifact['runtime']})")


def check_headline(artifact: dict, check: dict) -> str:
    """One line a CI log shows: 'edge-m@android-litert-int8 on tflite-runtime 2.14.0: parity FAILED (min cos 0.11)'."""
    values = check.get("values", {})
    if check["name"] == "parity" and values.get("min_cosine") is not None:
        short = f"min cos {values['min_cosine']:.4f}"
    elif check["name"] == "retrieval" and values.get("top1_drop") is not None:
        short = f"top-1 {values['runtime']['top1']:.3f}, drop {values['top1_drop']:+.3f}"
    elif check["name"] == "budget_latency" and values.get("median_ms") is not None:
        short = f"median {values['median_ms']:.2f} ms"
    else:
        short = check["detail"].split("; ")[0][:160]
    verdict = {"pass": "passed", "fail": "FAILED", "skip": "skipped"}[check["status"]]
    return f"{artifact['member']}@{artifact['profile']} on {artifact['runtime']}: {check['name']} {verdict} ({short})"


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
        classname = f"hetero.verify.{artifact['profile']}.{artifact['member']}"
        suite = ET.SubElement(root, "testsuite", name=artifact_label(artifact), tests=str(len(checks)),
                              failures=str(sum(c["status"] == "fail" for c in checks)),
                              skipped=str(sum(c["status"] == "skip" for c in checks)), errors="0")
        ET.SubElement(ET.SubElement(suite, "properties"), "property", name="file", value=artifact["file"])
        for check in checks:
            name = f"{check['name']} on {artifact['runtime']}"
            case = ET.SubElement(suite, "testcase", classname=classname, name=name, time="0")
            if check["status"] == "fail":
                ET.SubElement(case, "failure", message=check_headline(artifact, check)).text = check["detail"]
            elif check["status"] == "skip":
                ET.SubElement(case, "skipped", message=check_headline(artifact, check)[:500])
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


PLOTS = (("drop", "Drop from the torch member, per profile and runtime version"),
         ("latency", "Batch-1 latency against the profile's target"))


def _measured(report: dict) -> list[tuple[dict, dict]]:
    """(summary row, artifact) of every run with numbers, grouped by profile, then member, then runtime."""
    pairs = [(row, artifact) for row, artifact in zip(summary_rows(report), report["artifacts"])
             if row["min_cosine"] is not None or row["latency_ms"] is not None]
    return sorted(pairs, key=lambda p: (p[0]["profile"], p[0]["member"], p[0]["runtime"]))


def _values(artifact: dict, check: str) -> dict:
    return next((c.get("values", {}) for c in artifact["checks"] if c["name"] == check), {})


def _drop_figure(pairs, plt, np):
    """Two panels sharing one row per run: points of top-1 lost against torch, and 1 - min cosine (log).

    A one-point drop is a visible bar here (bars of top-1 from zero hid it); the tolerance of each run's
    profile is its red tick, so a bar past its tick is a failure at a glance.
    """
    labels = [f"{r['profile']} / {r['member']}\n{r['runtime']}" for r, _ in pairs]
    y = np.arange(len(pairs))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.5 * len(pairs) + 1.6), sharey=True)
    runtimes = sorted({r["runtime"].split()[0] for r, _ in pairs})
    colours = dict(zip(runtimes, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    for i, (row, artifact) in enumerate(pairs):
        colour = colours[row["runtime"].split()[0]]
        retrieval, parity = _values(artifact, "retrieval"), _values(artifact, "parity")
        if row["top1"] is not None:
            left.barh(i, 100 * (row["torch_top1"] - row["top1"]), color=colour)
        allowed = retrieval.get("allowed_drop")
        if allowed is not None:
            left.plot([100 * allowed] * 2, [i - 0.4, i + 0.4], color="#d83b3b", linewidth=2)
        if row["min_cosine"] is not None:
            right.barh(i, max(1.0 - row["min_cosine"], 1e-7), color=colour)
        if parity.get("tolerance") is not None and parity["tolerance"] < 1:
            right.plot([1 - parity["tolerance"]] * 2, [i - 0.4, i + 0.4], color="#d83b3b", linewidth=2)
    left.axvline(0, color="#555555", linewidth=0.8)
    left.set_yticks(y, labels, fontsize=7)
    left.invert_yaxis()
    left.set_xlabel("top-1 drop vs torch (points; red: allowed)")
    right.set_xscale("log")
    right.set_xlabel("1 - min cosine to torch (log; red: tolerance)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[r]) for r in runtimes]
    right.legend(handles, runtimes, fontsize=7, loc="lower right")
    fig.suptitle("Drop from the torch member, per profile and runtime version (shorter is better)", fontsize=10)
    fig.tight_layout()
    return fig


def _latency_figure(pairs, plt, np):
    timed = [(r, a) for r, a in pairs if r["latency_ms"] is not None]
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(timed) + 1.4))
    y = np.arange(len(timed))
    ax.barh(y, [r["latency_ms"] for r, _ in timed], color="#3bd87d")
    for i, (_, artifact) in enumerate(timed):
        target = _values(artifact, "budget_latency").get("target_ms")
        if target is not None:
            ax.plot([target] * 2, [i - 0.4, i + 0.4], color="#d83b3b", linewidth=2)
    ax.set_yticks(y, [f"{r['profile']} / {r['member']}\n{r['runtime']}" for r, _ in timed], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median batch-1 latency, ms on this CPU (log; red: the profile's target)")
    fig.tight_layout()
    return fig


def plots(report: dict) -> dict[str, bytes]:
    """PNG bytes per plot name; plots without data are left out."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    pairs = _measured(report)
    out: dict[str, bytes] = {}
    if any(r["min_cosine"] is not None for r, _ in pairs):
        out["drop"] = _figure_png(_drop_figure([p for p in pairs if p[0]["min_cosine"] is not None], plt, np))
    if any(r["latency_ms"] is not None for r, _ in pairs):
        out["latency"] = _figure_png(_latency_figure(pairs, plt, np))
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
    elsewhere = f" ({counts['skip_platform']} run only on another platform)" if counts.get("skip_platform") else ""
    return (f"{verdict}: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped checks{elsewhere} "
            f"over {len(report['artifacts'])} artifact(s) of family {report['family']} (space {report['space_id']}); "
            f"{report['queries']} held-out queries vs {report['gallery']} cloud-gallery images; host "
            f"{report.get('host', '?')}; {report.get('seconds', 0):.1f} s")


def to_markdown(report: dict, images: dict[str, str]) -> str:
    def row(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    head, body = _summary_table(report)
    lines = [f"# hetero verify: {report['family']}", "", f"**{_headline(report)}**", "",
             f"Source: `{report['source']}`", "", "## Summary", "", row(head), row(["---"] * len(head))]
    lines += [row(cells) for cells in body]
    for name, title in PLOTS:
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
    for name, title in PLOTS:
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
