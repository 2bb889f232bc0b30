"""The `hetero` command: one verb per pipeline stage, and `run` for all of them.

Each stage reads what the previous one wrote under the family directory, so stages can be re-run alone.
Errors a user can fix (bad config, missing stage output, failed conversion) print one paragraph and exit
with status 2; failed verification exits with status 1.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console

console = Console()


def _train(args) -> int:
    from hetero import distributed
    from hetero.config import load_config
    from hetero.train import train

    config = load_config(args.config)
    manifest = train(config, args.out, resume=args.resume, progress=not args.quiet)
    skipped = manifest["data"]["skipped_images"]
    if distributed.is_main():  # under torchrun, rank 0 speaks for all
        console.print(f"trained family [bold]{manifest['family']}[/] (space id {manifest['space_id']}) into "
                      f"{args.out}; {manifest['data']['train_images']} training images, "
                      f"{len(skipped)} unreadable skipped")
    return 0


def _eval(args) -> int:
    from hetero.evaluate import evaluate, format_backward, format_edges, format_report

    report = evaluate(args.dir)
    console.print(format_report(report))
    console.print(format_edges(report))
    if "backward" in report:
        console.print(format_backward(report))
    if report["skipped_images"]:
        console.print(f"{len(report['skipped_images'])} unreadable image(s) were skipped (listed in report.json)")
    return 0


def _export(args) -> int:
    from hetero.config import load_config
    from hetero.export import export_member
    from hetero.profiles import all_profiles, load_profile

    run_dir = Path(args.dir)
    if args.all_profiles:
        profiles = all_profiles()
    else:
        names = args.profile or load_config(run_dir / "config.yaml").export.profiles
        profiles = [load_profile(name) for name in names]
    for profile in profiles:
        members = args.member or [None]
        for member in members:
            artifact = export_member(run_dir, member, profile, allow_over_budget=args.allow_over_budget)
            console.print(f"exported {artifact['member']} for {profile.name}: {artifact['file']} "
                          f"({artifact['bytes'] / 2**20:.2f} MB, {artifact['export_seconds']} s)")
    return 0


def _export_edges(run_dir: Path, profiles: list[str]) -> None:
    """Export every edge member for each of the config's profiles (the `run` pipeline's export stage)."""
    from hetero.export import export_member
    from hetero.manifest import read_manifest
    from hetero.profiles import load_profile

    edges = [m["name"] for m in read_manifest(run_dir)["members"] if m["role"] == "edge"]
    for name in profiles:
        profile = load_profile(name)
        for edge in edges:
            artifact = export_member(run_dir, edge, profile)
            console.print(f"exported {edge} for {profile.name}: {artifact['file']}")


def _verify(args) -> int:
    from hetero.verify import format_summary, format_verify, verify, write_junit

    images = getattr(args, "images", None)
    runs = getattr(args, "latency_runs", None) or 30
    strict = getattr(args, "strict", False)
    bundle = getattr(args, "bundle", None)
    if args.dir is None and bundle is None:
        console.print("error: give a family DIR, or --bundle FILE to verify a bundle", style="bold red")
        return 2
    if args.dir is None:  # verify a bundle written by `hetero verify DIR --bundle FILE`
        from hetero.bundle import verify_bundle

        report = verify_bundle(bundle, latency_runs=runs, strict=strict, json_out=getattr(args, "json", None),
                               all_runtimes=getattr(args, "all_runtimes", False))
        where = report["json"]
    else:
        report = verify(args.dir, profile=args.profile, max_images=images, latency_runs=runs, strict=strict,
                        bundle=bundle, all_runtimes=getattr(args, "all_runtimes", False))
        where = f"{args.dir}/verify.json"
    from rich.console import Console

    wide = console if console.is_terminal else Console(width=160)  # CI logs: do not squeeze tables to 80
    wide.print(format_verify(report))
    if report["artifacts"]:
        wide.print(format_summary(report))
    if getattr(args, "junit", None):
        write_junit(report, args.junit)
        console.print(f"JUnit XML: {args.junit}")
    if getattr(args, "report", None):
        from hetero.report import write_report

        console.print(f"report: {write_report(report, args.report)}")
    if args.dir is not None and bundle:
        console.print(f"bundle for another machine (`hetero verify --bundle {bundle}`): {bundle}")
    if not report["artifacts"]:
        console.print("[bold red]no exported artifacts to verify[/]: run `hetero export` first")
        return 1
    counts = report["counts"]
    failed = [f"{a['member']}@{a['profile']} ({a['runtime']})" for a in report["artifacts"] if not a["passed"]]
    if failed:
        console.print(f"[bold red]verification failed[/] for {', '.join(failed)} (details in {where})")
        return 1
    if counts["skip"]:
        skipped = sorted({c["detail"] for a in report["artifacts"] for c in a["checks"] if c["status"] == "skip"})
        console.print(f"[yellow]{counts['skip']} check(s) skipped, not passed[/]: " + "; ".join(skipped[:5]),
                      markup=True, highlight=False)
        if strict:
            console.print("[bold red]--strict: skipped checks fail the verification[/]")
            return 1
    console.print(f"[green]all {counts['pass']} run check(s) of {len(report['artifacts'])} artifact(s) passed[/]")
    return 0


def _run(args) -> int:
    from hetero.config import load_config

    config = load_config(args.config)
    _train(args)
    _eval(argparse.Namespace(dir=args.out))
    _export_edges(Path(args.out), config.export.profiles)
    return _verify(argparse.Namespace(dir=args.out, profile=None, images=None))


def _profiles(args) -> int:
    from dataclasses import asdict

    import yaml
    from rich.table import Table

    from hetero.profiles import all_profiles, load_profile

    if args.action == "show":
        console.print(yaml.safe_dump(asdict(load_profile(args.name)), sort_keys=False), markup=False)
        return 0
    table = Table(title="Device profiles")
    for column in ("name", "format", "precision", "layout", "batch", "runtime", "description"):
        table.add_column(column)
    for p in all_profiles():
        table.add_row(p.name, p.format, p.precision, p.layout, str(p.batch or "dynamic"), p.verify.runtime,
                      p.description)
    console.print(table)
    return 0


def _gallery(args) -> int:
    from hetero import gallery

    if args.action == "build":
        record = gallery.build_gallery(args.dir, args.images, args.out, member=args.member,
                                       shard_size=args.shard_size, batch_size=args.batch_size,
                                       workers=args.workers, index=args.index, overwrite=args.overwrite,
                                       progress=not args.quiet)
        from hetero import distributed

        if distributed.is_main():
            index = record["index"]
            console.print(f"gallery of {record['rows']} images ({record['skipped']} unreadable skipped) embedded by "
                          f"{record['member']} in space {record['space_id']}: {len(record['shards'])} shard(s), "
                          f"{index['kind']} index in {args.out or Path(args.dir) / 'gallery'}")
        return 0
    location = args.gallery or Path(args.dir) / "gallery"
    model = gallery.open_query_model(args.dir, member=args.member, artifact=args.artifact)
    results = gallery.search_images(location, args.images, model, k=args.k, nprobe=args.nprobe)
    if args.json:
        from hetero.manifest import atomic_write_json

        atomic_write_json(args.json, {"gallery": str(location), "query_model": model.label,
                                      "space_id": model.space_id, "k": args.k, "queries": results})
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{len(results)} queries by {escape(model.label)} against {escape(str(location))}")
    table.add_column("query")
    table.add_column(f"top {args.k} (score)")
    for item in results[: args.show]:
        found = "skipped (unreadable)" if item.get("skipped") else ", ".join(
            f"{r['name']} ({r['score']:.3f})" for r in item["results"])
        table.add_row(escape(item["query"]), escape(found))
    console.print(table)
    if len(results) > args.show:
        console.print(f"... {len(results) - args.show} more" + (f" in {args.json}" if args.json else
                                                                " (use --json FILE for all)"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hetero", description="Train, evaluate, export and verify compatible cloud-edge embedding families.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every epoch and step detail")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def training_options(p):
        p.add_argument("config", help="family config (YAML), e.g. examples/quickstart.yaml")
        p.add_argument("--out", required=True, help="family directory to write (checkpoints, manifest, reports)")
        p.add_argument("--resume", action="store_true", help="continue from the last finished epoch in --out")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = verbs.add_parser("run", help="the whole pipeline: train, eval, export, verify",
                         description="Train the family, evaluate compatibility, export every edge member for the "
                                     "config's export.profiles and verify the exported files.")
    training_options(p)
    p.set_defaults(handler=_run)

    p = verbs.add_parser("train", help="train a family jointly", description="Train every member of the family "
                         "on the same batches and write checkpoints and DIR/manifest.json.")
    training_options(p)
    p.set_defaults(handler=_train)

    p = verbs.add_parser("eval", help="compatibility matrix on held-out classes",
                         description="Evaluate every (query member, gallery member) pair on classes never seen in "
                                     "training; write DIR/report.json.")
    p.add_argument("dir", help="family directory written by `hetero train`")
    p.set_defaults(handler=_eval)

    p = verbs.add_parser("export", help="export members per device profile",
                         description="Convert members to the format of a device profile and register the files in "
                                     "the manifest.  Without --member the most accurate edge member that fits the "
                                     "profile's budgets is chosen.")
    p.add_argument("dir", help="family directory written by `hetero train`")
    p.add_argument("--profile", action="append", help="profile name or .yaml path (repeatable); default: the "
                                                      "config's export.profiles")
    p.add_argument("--all-profiles", action="store_true", help="export for every built-in profile")
    p.add_argument("--member", action="append", help="member to export (repeatable); default: chosen by budget")
    p.add_argument("--allow-over-budget", action="store_true", help="export members that exceed the budgets "
                                                                     "(recorded in the manifest)")
    p.set_defaults(handler=_export)

    p = verbs.add_parser("verify", help="check exported files in their runtimes",
                         description="Run every exported artifact in its runtime on real held-out images: identity, "
                                     "structure, parity with the torch member, retrieval against the cloud gallery "
                                     "and budgets (size, params, FLOPs, latency). Exit status 0 only when no check "
                                     "fails (with --strict: and none is skipped). `hetero verify DIR --bundle F` "
                                     "also writes a self-contained bundle; `hetero verify --bundle F` checks one "
                                     "(e.g. on a Mac, for CoreML).")
    p.add_argument("dir", nargs="?", help="family directory with exported artifacts (omit to verify --bundle)")
    p.add_argument("--profile", help="verify only the artifacts of this profile (name, or a .yaml whose budgets "
                                     "and tolerances then apply)")
    p.add_argument("--images", type=int, help="number of held-out queries to use (default: export.verify_images)")
    p.add_argument("--bundle", metavar="ZIP", help="with DIR: write a verification bundle; alone: verify it")
    p.add_argument("--junit", metavar="FILE", help="write JUnit XML, one test case per check")
    p.add_argument("--report", metavar="FILE", help="write a report with plots (.html, or .md with PNGs beside)")
    p.add_argument("--json", metavar="FILE", help="bundle mode: where to write the JSON report "
                                                  "(default: beside the bundle)")
    p.add_argument("--latency-runs", type=int, default=30, help="batch-1 runs for the latency median (default 30)")
    p.add_argument("--strict", action="store_true", help="skipped checks (runtime unavailable here) also fail")
    p.add_argument("--all-runtimes", action="store_true", help="also run each artifact in every other installed "
                                                               "runtime of its format (e.g. tflite_runtime)")
    p.set_defaults(handler=_verify)

    p = verbs.add_parser("profiles", help="list or show device profiles",
                         description="List the built-in device profiles or show one in full.")
    p.add_argument("action", choices=["list", "show"])
    p.add_argument("name", nargs="?", help="profile name or path (for show)")
    p.set_defaults(handler=_profiles)

    p = verbs.add_parser("gallery", help="embed a gallery with the cloud member, index and search it",
                         description="`build` embeds a folder or zip of images into sharded files (resumable, "
                                     "parallel under torchrun) and a FAISS index; `search` queries it with any "
                                     "member or exported artifact of the same embedding space.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    b = actions.add_parser("build", help="embed images into a sharded, indexed gallery")
    b.add_argument("dir", help="family directory written by `hetero train`")
    b.add_argument("--images", required=True, help="folder or .zip of images (any format Pillow reads)")
    b.add_argument("--out", help="gallery directory (default: DIR/gallery)")
    b.add_argument("--member", help="member that embeds the gallery (default: the cloud member)")
    b.add_argument("--shard-size", type=int, default=4096, help="images per shard file (default 4096)")
    b.add_argument("--batch-size", type=int, default=256, help="images per forward pass; divides --shard-size")
    b.add_argument("--workers", type=int, default=1, help="image decoding processes (default 1)")
    b.add_argument("--index", choices=["auto", "flat", "ivf", "hnsw"], default="auto",
                   help="FAISS index: exact flat up to 100k images, IVF above (auto, the default)")
    b.add_argument("--overwrite", action="store_true", help="discard an existing gallery in --out and start over")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    s = actions.add_parser("search", help="nearest gallery images of query images")
    s.add_argument("dir", help="family directory (its members are the query models; its config the decoding)")
    s.add_argument("--images", required=True, help="folder or .zip of query images")
    s.add_argument("--gallery", help="gallery directory (default: DIR/gallery)")
    who = s.add_mutually_exclusive_group()
    who.add_argument("--member", help="member that embeds the queries (default: the cloud member)")
    who.add_argument("--artifact", help="exported file (.onnx, ...) that embeds the queries in its runtime")
    s.add_argument("-k", type=int, default=5, help="neighbours per query (default 5)")
    s.add_argument("--nprobe", type=int, help="IVF lists to visit (default: the gallery's own)")
    s.add_argument("--show", type=int, default=20, help="queries to print (default 20)")
    s.add_argument("--json", help="write every query's neighbours to this JSON file")
    p.set_defaults(handler=_gallery)
    return parser


def main(argv: list[str] | None = None) -> int:
    from hetero.config import ConfigError
    from hetero.data import DataError
    from hetero.export.common import ExportError
    from hetero.manifest import ManifestError

    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("hetero").setLevel(logging.INFO if args.verbose else logging.WARNING)
    if args.verb == "profiles" and args.action == "show" and not args.name:
        console.print("error: `hetero profiles show` needs a profile NAME", style="bold red")
        return 2
    try:
        return args.handler(args)
    except (ConfigError, DataError, ManifestError, ExportError) as err:
        console.print(f"error: {err}", style="bold red", markup=False, highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted; finished epochs are checkpointed (use --resume)", style="yellow")
        return 130


if __name__ == "__main__":
    sys.exit(main())
