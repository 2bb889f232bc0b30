"""The `hetero` command: one verb per pipeline stage, and `run` for all of them.

Each stage reads what the previous one wrote under the family directory, so stages can be re-run alone.
Errors a user can fix (bad config, missing stage output, failed conversion, a directory another stage
holds) print one paragraph and exit with status 2; failed verification exits with status 1.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape


def _log_width() -> int | None:
    """Rich squeezes everything to 80 columns when stdout is not a terminal, cutting tables in CI logs and
    piped output: give those 200 columns, unless COLUMNS says otherwise (None: rich's own choice)."""
    return None if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit() else 200


console = Console(width=_log_width())


# ------------------------------------------------------------------------------------------------ stages


class LogLines:
    """Progress as plain lines where stdout is a log (a file, a pipe, CI), in which progress bars show nothing:
    one line per finished training epoch and per stage of `hetero run`, with the time since the command began."""

    def __init__(self, quiet: bool):
        self.enabled = not quiet and not console.is_terminal
        self.started = time.perf_counter()

    def say(self, text: str) -> None:
        from datetime import timedelta

        from hetero import distributed

        if self.enabled and distributed.is_main():  # under torchrun, rank 0 speaks for all
            elapsed = timedelta(seconds=round(time.perf_counter() - self.started))
            console.print(f"{text} [{elapsed} elapsed]", markup=False, highlight=False)

    def epoch(self, end) -> None:
        """A training callback (hetero.training.EpochEnd)."""
        self.say(f"epoch {end.epoch}/{end.epochs} (phase {end.phase + 1}): loss {end.loss:.4f}")


def train_family(config_path: str, out: str, *, resume: bool = False, overwrite: bool = False,
                 quiet: bool = False, lines: LogLines | None = None):
    from hetero import distributed
    from hetero.config import load_config
    from hetero.training import train

    lines = lines or LogLines(quiet)
    store = train(load_config(config_path), out, resume=resume, overwrite=overwrite, progress=not quiet,
                  callbacks=[lines.epoch])
    if distributed.is_main():  # under torchrun, rank 0 speaks for all
        data = store.manifest.data
        console.print(f"trained family [bold]{escape(store.name)}[/] (space id {store.space_id}) into "
                      f"{escape(str(out))}; {data.train_images} training images, {len(data.skipped_images)} "
                      f"unreadable skipped")
    return store


def evaluate_family(store) -> dict:
    from hetero.evaluate import (evaluate, format_backward, format_early_exit, format_edges, format_label_free,
                                 format_report)

    report = evaluate(store)
    if "matrix" in report:
        console.print(format_report(report))
        console.print(format_edges(report))
    if report.get("label_free"):
        console.print(format_label_free(report))
    if "backward" in report:
        console.print(format_backward(report))
    if report.get("early_exit"):
        console.print(format_early_exit(report))
    if report["skipped_images"]:
        console.print(f"{len(report['skipped_images'])} unreadable image(s) were skipped (listed in report.json)")
    return report


def export_family(store, profiles: list, members: list[str | None], *, allow_over_budget: bool = False,
                  verbose: bool = False, quiet: bool = False) -> list:
    """Export each member (None: chosen by budget) for each profile, with one progress bar of ours."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from hetero.exporter import export_member

    jobs = [(profile, member) for profile in profiles for member in members]
    artifacts = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with store.lock("export"), Progress(*columns, console=console, transient=True, auto_refresh=False,
                                        disable=quiet or verbose) as progress:
        task = progress.add_task("exporting", total=len(jobs))
        for profile, member in jobs:
            progress.update(task, description=f"exporting {member or 'the best edge'} for {profile.name}",
                            refresh=True)
            artifact = export_member(store, member, profile, allow_over_budget=allow_over_budget, verbose=verbose)
            artifacts.append(artifact)
            progress.update(task, advance=1, refresh=True)
            console.print(f"exported {artifact.member} for {profile.name}: {artifact.file} "
                          f"({artifact.bytes / 2**20:.2f} MB, {artifact.export_seconds} s)", highlight=False)
    return artifacts


def verify_family(store, *, profile: str | None = None, images: int | None = None, latency_runs: int = 30,
                  strict: bool = False, all_runtimes: bool = False, junit: str | None = None,
                  report_file: str | None = None, bundle: str | None = None) -> int:
    from hetero.verify import verify

    report, reference = verify(store, profile=profile, max_images=images, latency_runs=latency_runs,
                               strict=strict, all_runtimes=all_runtimes)
    if reference is None:  # a stage run before the one it needs: exit 2, as any error a user can fix
        from hetero.errors import ManifestError

        wanted = f" for profile {profile!r}" if profile else ""
        raise ManifestError(f"{store.root}: no exported artifacts{wanted} to verify; run `hetero export` first; "
                            f"nothing was written")
    if bundle:
        from hetero.verify.bundle import write_bundle

        write_bundle(reference, bundle, report)
    return _verdict(report, f"{store.root}/verify.json", junit, report_file, bundle)


def verify_bundle_file(bundle: str, *, latency_runs: int = 30, strict: bool = False, json_out: str | None = None,
                       all_runtimes: bool = False, junit: str | None = None, report_file: str | None = None) -> int:
    from hetero.verify.bundle import verify_bundle

    report = verify_bundle(bundle, latency_runs=latency_runs, strict=strict, json_out=json_out,
                           all_runtimes=all_runtimes)
    if not report["artifacts"]:
        from hetero.verify.bundle import BundleError

        raise BundleError(f"{bundle}: the bundle holds no artifacts to verify")
    return _verdict(report, report["json"], junit, report_file, None)


def _verdict(report: dict, where: str, junit: str | None, report_file: str | None, bundle: str | None) -> int:
    from hetero.verify.report import format_summary, format_verify, write_junit

    console.print(format_verify(report))
    console.print(format_summary(report))
    if junit:
        write_junit(report, junit)
        console.print(f"JUnit XML: {escape(junit)}")
    if report_file:
        from hetero.verify.report import write_report

        console.print(f"report: {escape(str(write_report(report, report_file)))}")
    if bundle:
        console.print(f"bundle for another machine (`hetero verify --bundle {escape(bundle)}`): {escape(bundle)}")
    failed = [f"{a['member']}@{a['profile']} ({a['runtime']})" for a in report["artifacts"] if not a["passed"]]
    if failed:
        console.print(f"[bold red]verification failed[/] for {escape(', '.join(failed))} (details in {escape(where)})")
        return 1
    counts = report["counts"]
    if counts["skip"]:
        skipped = sorted({c["detail"] for a in report["artifacts"] for c in a["checks"] if c["status"] == "skip"})
        console.print(f"[yellow]{counts['skip']} check(s) skipped, not passed[/]: " + escape("; ".join(skipped[:5])),
                      highlight=False)
        if report.get("strict"):
            console.print("[bold red]--strict: skipped checks fail the verification[/]")
            return 1
    console.print(f"[green]all {counts['pass']} run check(s) of {len(report['artifacts'])} artifact(s) passed[/]")
    return 0


# ---------------------------------------------------------------------------------------------- handlers


def _open(directory: str):
    from hetero.family import FamilyStore

    return FamilyStore.open(directory)


def _cmd_run(args) -> int:
    from hetero.profiles import load_profile

    lines = LogLines(args.quiet)
    lines.say("hetero run: stage 1/4, train")
    store = train_family(args.config, args.out, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet,
                         lines=lines)
    lines.say("hetero run: stage 2/4, eval")
    evaluate_family(store)
    lines.say("hetero run: stage 3/4, export")
    profiles = [load_profile(name) for name in store.config().export.profiles]
    export_family(store, profiles, [m.name for m in store.edges], verbose=args.verbose, quiet=args.quiet)
    lines.say("hetero run: stage 4/4, verify")
    return verify_family(store)


def _cmd_train(args) -> int:
    train_family(args.config, args.out, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet)
    return 0


def _cmd_search(args) -> int:
    from rich.table import Table

    from hetero.config import load_config
    from hetero.search import search

    store = search(load_config(args.config), args.out, resume=args.resume, overwrite=args.overwrite,
                   progress=not args.quiet)
    table = Table(title=f"students found for {escape(store.name)}")
    for column in ("member", "profile", "sub-network", "MFLOPs", "of the cloud", "latency ms", "validation top-1"):
        table.add_column(column)
    for m in store.edges:
        found = m.search or {}
        table.add_row(m.name, escape(found.get("profile", "")), found.get("candidate", ""), f"{m.flops / 1e6:.1f}",
                      f"{m.flops_vs_cloud:.4f}", f"{found.get('latency_ms', 0):.3f}",
                      f"{found.get('validation_top1', 0):.4f}")
    console.print(table)
    console.print(f"Pareto fronts and plots: {escape(str(store.root / 'search'))}; next: hetero eval {escape(args.out)}")
    return 0


def _cmd_eval(args) -> int:
    evaluate_family(_open(args.dir))
    return 0


def _cmd_calibrate(args) -> int:
    from hetero.errors import CalibrationError
    from hetero.training.exits import calibrate

    store = _open(args.dir)
    member = args.member
    if member is None:
        multi = [m.name for m in store.members if m.kind == "multi-exit"]
        if len(multi) != 1:
            raise CalibrationError(f"calibrate: give --member; {store.name!r} has {len(multi)} multi-exit members"
                                   f"{': ' + ', '.join(multi) if multi else ''}")
        member = multi[0]
    thresholds = None
    if args.thresholds is not None:
        try:
            thresholds = [float(t) for t in args.thresholds.split(",")]
        except ValueError:
            raise CalibrationError(f"--thresholds {args.thresholds!r}: give numbers separated by commas") from None
    rule = calibrate(store, member, args.top1_loss, args.mean_mflops, args.escalate, thresholds)
    found = rule["calibration"]
    above = rule["escalate_above"]
    # with escalation the target is met by the system (edge plus cloud), so its top-1 is the one to print
    cloud, top1 = ("", f"top-1 {found['top1']:.3f}") if above is None else (
        f"; to the cloud above {above:.4f}", f"top-1 {found['top1_system']:.3f} with the cloud ({found['top1']:.3f} "
                                             f"on the edge alone)")
    console.print(f"{escape(member)}: thresholds {', '.join(f'{t:.4f}' for t in rule['thresholds'])}{cloud}"
                  f" on {found['images']} held-out training images: {top1} (last exit "
                  f"{found['top1_last_exit']:.3f}), mean {found['mean_mflops']:.2f} MFLOPs, shares per exit "
                  f"{', '.join(f'{s:.2f}' for s in found['shares'])}, escalated {found['escalated']:.2f}",
                  highlight=False)
    return 0


def _cmd_export(args) -> int:
    from hetero.profiles import all_profiles, load_profile

    store = _open(args.dir)
    if args.all_profiles:
        profiles = all_profiles()
    else:
        profiles = [load_profile(name) for name in args.profile or store.config().export.profiles]
    members = args.member or [None]
    for member in args.member or []:
        store.member(member)  # an unknown name fails before any conversion
    export_family(store, profiles, members, allow_over_budget=args.allow_over_budget, verbose=args.verbose,
                  quiet=args.quiet)
    return 0


def _cmd_verify(args) -> int:
    from hetero.errors import ConfigError

    if args.dir is None and args.bundle is None:
        raise ConfigError("verify: give a family DIR, or --bundle FILE to verify a bundle")
    from hetero.files import check_output

    outputs = {"--json": args.json, "--junit": args.junit, "--report": args.report,
               "--bundle": args.bundle if args.dir is not None else None}  # alone, --bundle is read
    for flag, path in outputs.items():
        if path is not None:
            check_output(path, flag)  # before the verification, not after it
    if args.dir is None:  # verify a bundle written by `hetero verify DIR --bundle FILE`
        return verify_bundle_file(args.bundle, latency_runs=args.latency_runs, strict=args.strict,
                                  json_out=args.json, all_runtimes=args.all_runtimes, junit=args.junit,
                                  report_file=args.report)
    return verify_family(_open(args.dir), profile=args.profile, images=args.images, latency_runs=args.latency_runs,
                         strict=args.strict, all_runtimes=args.all_runtimes, junit=args.junit,
                         report_file=args.report, bundle=args.bundle)


def _cmd_profiles(args) -> int:
    from dataclasses import asdict

    import yaml
    from rich.table import Table

    from hetero.errors import ConfigError
    from hetero.profiles import all_profiles, load_profile

    if args.action == "show":
        if not args.name:
            raise ConfigError("`hetero profiles show` needs a profile NAME (or the path of a profile .yaml)")
        console.print(yaml.safe_dump(asdict(load_profile(args.name)), sort_keys=False), markup=False)
        return 0
    table = Table(title="Device profiles")
    for column in ("name", "format", "precision", "layout", "batch", "runtime", "description"):
        table.add_column(column)
    for p in all_profiles():
        table.add_row(p.name, p.format, p.precision, p.layout, str(p.batch or "dynamic"), escape(p.verify.runtime),
                      escape(p.description))
    console.print(table)
    return 0


def _cmd_gallery(args) -> int:
    from hetero import distributed, gallery

    store = _open(args.dir)
    if getattr(args, "json", None):
        from hetero.files import check_output

        check_output(args.json, "--json")
    if args.action in ("delete", "update", "adopt", "migrate") or getattr(args, "store", "faiss") == "milvus":
        return _cmd_gallery_db(args, store)
    if args.action == "import":
        record = gallery.import_gallery(store, args.vectors, args.images, args.out, ids=args.ids, member=args.member,
                                        sample=args.sample, index=args.index, overwrite=args.overwrite)
        proof = record["proof"]
        console.print(f"imported {record['rows']} vectors into {escape(str(args.out))}: {proof['checked']} re-embedded "
                      f"images match their stored vectors (min cosine {proof['min_cosine']:.6f}); stamped with space "
                      f"{record['space_id']}, {record['index']['kind']} index")
        return 0
    if args.action == "build":
        record = gallery.build_gallery(store, args.images, args.out, member=args.member, shard_size=args.shard_size,
                                       batch_size=args.batch_size, workers=args.workers, index=args.index,
                                       overwrite=args.overwrite, progress=not args.quiet)
        if distributed.is_main():
            index = record["index"]
            console.print(f"gallery of {record['rows']} images ({record['skipped']} unreadable skipped) embedded by "
                          f"{escape(record['member'])} in space {record['space_id']}: {len(record['shards'])} "
                          f"shard(s), {index['kind']} index in {escape(str(args.out or store.root / 'gallery'))}")
        return 0
    _search(args, store, args.gallery or store.root / "gallery")
    return 0


def _search(args, store, target) -> None:
    from hetero import gallery

    model = gallery.open_query_model(store, member=args.member, artifact=args.artifact)
    results = gallery.search_images(target, args.images, model, k=args.k, nprobe=args.nprobe)
    where = f"{target.uri} collection {target.name}" if hasattr(target, "uri") else str(target)
    if args.json:
        from hetero.files import atomic_write_json

        atomic_write_json(args.json, {"gallery": where, "query_model": model.label, "space_id": model.space_id,
                                      "k": args.k, "queries": results})
    _print_search(results, model, where, args)


def _cmd_gallery_db(args, store) -> int:
    """The gallery verbs on a Milvus collection (embedded by default, in DIR/gallery.db)."""
    from hetero.gallery import db as gallery_db
    from hetero.gallery.stores import MilvusStore

    uri = args.uri or str(store.root / "gallery.db")
    if args.action == "search":
        _search(args, store, MilvusStore(uri, args.collection))
    elif args.action in ("build", "update", "migrate"):
        options = {"member": args.member, "batch_size": args.batch_size, "workers": args.workers,
                   "progress": not args.quiet}
        if args.action == "migrate":
            record = gallery_db.migrate(store, args.images, uri, args.collection, **options)
        else:
            record = gallery_db.build(store, args.images, uri, args.collection, overwrite=args.action == "build"
                                      and args.overwrite, replace=args.action == "update", **options)
        console.print(f"wrote {record['written']} rows into {escape(uri)} collection {escape(record['collection'])} "
                      f"({record['already_there']} already there, {len(record['skipped'])} unreadable skipped; "
                      f"{record['rows']} rows in all) in {record['seconds']:.1f} s, {record['rows_per_s']:.0f} rows/s"
                      + (f"; alias {escape(record['alias'])} now names it" if args.action == "migrate" else ""))
    elif args.action == "delete":
        removed, absent = gallery_db.delete(store, uri, args.collection, args.ids)
        console.print(f"deleted {removed} of {len(args.ids)} row(s) from {escape(uri)} collection "
                      f"{escape(args.collection)}" + (f"; {absent} not there" if absent else ""))
    else:
        record = gallery_db.adopt(store, uri, args.collection, args.images, member=args.member, sample=args.sample)
        console.print(f"adopted {escape(uri)} collection {escape(args.collection)}: {record['checked']} re-embedded "
                      f"images match their stored vectors (min cosine {record['min_cosine']:.6f}); it now says space "
                      f"{record['space_id']}")
    return 0


def _print_search(results: list[dict], model, location, args) -> None:
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
        console.print(f"... {len(results) - args.show} more" + (f" in {escape(args.json)}" if args.json else
                                                                " (use --json FILE for all)"))


def _cmd_runtimes(args) -> int:
    from rich.table import Table

    from hetero import runtimes
    from hetero.errors import ConfigError

    if args.action == "add":
        wanted = list(args.requirement or [])
        for name in args.profile or []:
            from hetero.profiles import load_profile

            profile = load_profile(name)
            wanted += [r for r in profile.runtimes if runtimes.needs_environment(r)]
        if not wanted:
            raise ConfigError("runtimes add: give a requirement (e.g. tflite-runtime==2.14.0) or --profile NAME")
        for requirement in dict.fromkeys(wanted):
            started = time.perf_counter()
            env = runtimes.add(requirement, python=args.python)
            console.print(f"created {escape(env.label)} in {escape(str(env.path))} (Python {env.python}, "
                          f"{time.perf_counter() - started:.0f} s)")
        return 0
    if args.action == "remove":
        if len(args.requirement) != 1:
            raise ConfigError("runtimes remove: give one environment name or requirement (see `hetero runtimes list`)")
        for env in runtimes.remove(args.requirement[0]):
            console.print(f"removed {escape(env.label)} ({escape(str(env.path))})")
        return 0
    rows = runtimes.describe_environments()
    table = Table(title=f"Runtime environments in {escape(str(runtimes.home()))}")
    for column in ("name", "package", "version", "python", "state", "created (s)"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["package"], row["version"], row["python"], escape(row["state"]),
                      f"{row['created']} ({row['create_seconds']:g} s)")
    console.print(table if rows else "no runtime environments yet: `hetero runtimes add tflite-runtime==2.14.0`")
    return 0


# ------------------------------------------------------------------------------------------------ parser


def _count(minimum: int):
    """argparse type: an integer of at least `minimum`, refused with the value otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hetero", description="Train, evaluate, export and verify compatible cloud-edge embedding families.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log every epoch and step detail, and show the converters' own output")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _training_verbs(verbs)
    _stage_verbs(verbs)
    _gallery_verbs(verbs)
    _runtime_verbs(verbs)
    return parser


def _runtime_verbs(verbs) -> None:
    p = verbs.add_parser("runtimes", help="isolated environments for the runtime versions devices run",
                         description="`add` creates a virtual environment (in the user's cache directory) for one "
                                     "runtime package at one version, e.g. tflite-runtime==2.14.0, where verify and "
                                     "export run artifacts out of process; `list` shows them; `remove` deletes one.")
    p.add_argument("action", choices=["add", "list", "remove"])
    p.add_argument("requirement", nargs="*", help="add: package requirements; remove: a requirement or name")
    p.add_argument("--profile", action="append", help="add: every isolated runtime this profile declares")
    p.add_argument("--python", help="add: the interpreter for the environment (default: this one)")
    p.set_defaults(handler=_cmd_runtimes)


def _training_verbs(verbs) -> None:
    def training_options(p):
        p.add_argument("config", help="family config (YAML), e.g. examples/quickstart.yaml")
        p.add_argument("--out", required=True, help="family directory to write (checkpoints, manifest, reports)")
        again = p.add_mutually_exclusive_group()
        again.add_argument("--resume", action="store_true", help="continue from the last finished epoch in --out")
        again.add_argument("--overwrite", action="store_true", help="replace the family in --out (removes the files "
                                                                     "it wrote, none of yours)")
        p.add_argument("--quiet", action="store_true", help="no progress bars (nor, in a log, progress lines)")

    p = verbs.add_parser("run", help="the whole pipeline: train, eval, export, verify",
                         description="Train the family, evaluate compatibility, export every edge member for the "
                                     "config's export.profiles and verify the exported files.")
    training_options(p)
    p.set_defaults(handler=_cmd_run)
    p = verbs.add_parser("train", help="train a family jointly", description="Train every member of the family "
                         "on the same batches and write checkpoints and DIR/manifest.json.")
    training_options(p)
    p.set_defaults(handler=_cmd_train)
    p = verbs.add_parser("search", help="find the best compatible student per device profile",
                         description="Train one weight-sharing supernet (the config's `search` section), rank its "
                                     "sub-networks by M[candidate][cloud] on held-out training classes and by "
                                     "latency measured with each target profile's runtime, and write the chosen "
                                     "students into the family as ordinary members (DIR/search/ holds the Pareto "
                                     "fronts).")
    training_options(p)
    p.set_defaults(handler=_cmd_search)


def _stage_verbs(verbs) -> None:
    p = verbs.add_parser("eval", help="compatibility matrix on held-out classes",
                         description="Evaluate every (query member, gallery member) pair on classes never seen in "
                                     "training; write DIR/report.json.")
    p.add_argument("dir", help="family directory written by `hetero train`")
    p.set_defaults(handler=_cmd_eval)

    p = verbs.add_parser("calibrate", help="pick a multi-exit member's exit thresholds",
                         description="Pick the entropy thresholds of a multi-exit member on the training images held "
                                     "out of training (train.early_exit.held_out; never test classes) for a target: "
                                     "a top-1 loss budget against its last exit, or a mean FLOPs budget; optionally "
                                     "send the least sure share of queries to the cloud. Stored in the manifest and "
                                     "carried by later exports.")
    p.add_argument("dir", help="family directory written by `hetero train`")
    p.add_argument("--member", help="the multi-exit member (default: the only one)")
    p.add_argument("--top1-loss", type=float, help="top-1 given up against the last exit, as a fraction (0.005)")
    p.add_argument("--mean-mflops", type=float, help="mean MFLOPs per query on the edge")
    p.add_argument("--escalate", type=float, default=0.0, help="share of queries the last edge exit sends to the "
                                                               "cloud (the least sure ones), e.g. 0.1")
    p.add_argument("--thresholds", help="explicit thresholds, comma-separated, one per exit before the last")
    p.set_defaults(handler=_cmd_calibrate)

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
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_export)

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
    p.add_argument("--images", type=_count(1), help="number of held-out queries to use (default: export.verify_images)")
    p.add_argument("--bundle", metavar="ZIP", help="with DIR: write a verification bundle; alone: verify it")
    p.add_argument("--junit", metavar="FILE", help="write JUnit XML, one test case per check")
    p.add_argument("--report", metavar="FILE", help="write a report with plots (.html, or .md with PNGs beside)")
    p.add_argument("--json", metavar="FILE", help="bundle mode: where to write the JSON report "
                                                  "(default: beside the bundle)")
    p.add_argument("--latency-runs", type=_count(1), default=30, help="batch-1 runs for the latency median "
                                                                       "(default 30)")
    p.add_argument("--strict", action="store_true", help="skipped checks (runtime unavailable here) also fail")
    p.add_argument("--all-runtimes", action="store_true", help="also run each artifact in every other installed "
                                                               "runtime of its format")
    p.set_defaults(handler=_cmd_verify)

    p = verbs.add_parser("profiles", help="list or show device profiles",
                         description="List the built-in device profiles or show one in full.")
    p.add_argument("action", choices=["list", "show"])
    p.add_argument("name", nargs="?", help="profile name or path (for show)")
    p.set_defaults(handler=_cmd_profiles)


def _gallery_verbs(verbs) -> None:
    p = verbs.add_parser("gallery", help="embed a gallery with the cloud member, index and search it",
                         description="`build` embeds a folder or zip of images into sharded files (resumable, "
                                     "parallel under torchrun) and a FAISS index, or with --store milvus into a "
                                     "Milvus collection (embedded Milvus Lite by default, a server by --uri); "
                                     "`search` queries it with any member or exported artifact of the same "
                                     "embedding space.  On a Milvus collection: `update` re-embeds images, "
                                     "`delete` removes rows by name, `adopt` stamps a collection another tool "
                                     "wrote once a sample proves its space, `migrate` re-embeds into a new "
                                     "collection and moves an alias to it when complete.  `import` makes a FAISS "
                                     "gallery of vectors you already have, once a sample proves their space.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def store_options(a, milvus_only: bool = False):
        if not milvus_only:
            a.add_argument("--store", choices=["faiss", "milvus"], default="faiss",
                           help="faiss: files on this machine (default); milvus: a Milvus collection")
        a.add_argument("--uri", help="milvus: a local path (embedded Milvus Lite; default DIR/gallery.db) or "
                                     "http://host:19530 (a server or cluster)")
        a.add_argument("--collection", default="gallery", help="milvus: collection or alias (default: gallery)")

    def embedding_options(a):
        a.add_argument("--member", help="member that embeds the gallery (default: the cloud member)")
        a.add_argument("--batch-size", type=_count(1), default=256, help="images per forward pass")
        a.add_argument("--workers", type=_count(0), default=1, help="image decoding processes (default 1)")
        a.add_argument("--quiet", action="store_true", help="no progress bar")

    b = actions.add_parser("build", help="embed images into a sharded, indexed gallery or a collection")
    b.add_argument("dir", help="family directory written by `hetero train`")
    b.add_argument("--images", required=True, help="folder or .zip of images (any format Pillow reads)")
    b.add_argument("--out", help="faiss: gallery directory (default: DIR/gallery)")
    store_options(b)
    embedding_options(b)
    b.add_argument("--shard-size", type=_count(1), default=4096, help="faiss: images per shard file (default 4096)")
    b.add_argument("--index", choices=["auto", "flat", "ivf", "hnsw"], default="auto",
                   help="faiss: exact flat up to 100k images, IVF above (auto, the default)")
    b.add_argument("--overwrite", action="store_true",
                   help="discard an existing gallery (or collection) and start over")
    s = actions.add_parser("search", help="nearest gallery images of query images")
    s.add_argument("dir", help="family directory (its members are the query models; its config the decoding)")
    s.add_argument("--images", required=True, help="folder or .zip of query images")
    s.add_argument("--gallery", help="faiss: gallery directory (default: DIR/gallery)")
    store_options(s)
    who = s.add_mutually_exclusive_group()
    who.add_argument("--member", help="member that embeds the queries (default: the cloud member)")
    who.add_argument("--artifact", help="exported file (.onnx, ...) that embeds the queries in its runtime")
    s.add_argument("-k", type=_count(1), default=5, help="neighbours per query (default 5)")
    s.add_argument("--nprobe", type=_count(1), help="IVF lists to visit (default: the gallery's own, or 32)")
    s.add_argument("--show", type=_count(0), default=20, help="queries to print (default 20)")
    s.add_argument("--json", help="write every query's neighbours to this JSON file")
    i = actions.add_parser("import", help="a FAISS gallery from vectors you already have, once a sample proves "
                                          "their space")
    i.add_argument("dir", help="family directory (its cloud, or --member, re-embeds the sample)")
    i.add_argument("--vectors", required=True, help=".npy, .safetensors (tensor 'embeddings') or .parquet (columns "
                                                    "'id', 'embedding')")
    i.add_argument("--ids", help="item ids, one per line in row order (needed for .npy)")
    i.add_argument("--images", required=True, help="folder or .zip of the listed images, named as their ids")
    i.add_argument("--out", required=True, help="gallery directory to write")
    i.add_argument("--member", help="member that embedded the vectors (default: the cloud member)")
    i.add_argument("--sample", type=_count(1), default=64, help="images to re-embed (default 64)")
    i.add_argument("--index", choices=["auto", "flat", "ivf", "hnsw"], default="auto", help="as for build")
    i.add_argument("--overwrite", action="store_true", help="replace what is in --out")
    for name, help_, needs_images in (("update", "embed images again and replace their rows", True),
                                      ("migrate", "re-embed into a new collection, then move the alias", True),
                                      ("adopt", "stamp a collection another tool wrote, once a sample proves it", True),
                                      ("delete", "remove rows by image name", False)):
        a = actions.add_parser(name, help=f"milvus: {help_}")
        a.add_argument("dir", help="family directory")
        if needs_images:
            a.add_argument("--images", required=True, help="folder or .zip of images, named as the collection's ids")
        store_options(a, milvus_only=True)
        if name == "delete":
            a.add_argument("--ids", nargs="+", required=True, help="image names to remove")
        elif name == "adopt":
            a.add_argument("--member", help="member that embedded the collection (default: the cloud member)")
            a.add_argument("--sample", type=_count(1), default=64, help="images to re-embed (default 64)")
        else:
            embedding_options(a)
    p.set_defaults(handler=_cmd_gallery)


# -------------------------------------------------------------------------------------------------- main


@contextmanager
def _terminate_like_interrupt():
    """SIGTERM unwinds like Ctrl-C, so half-written files are removed and locks released on the way out."""
    def terminate(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    from hetero.errors import HeteroError

    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("hetero").setLevel(logging.INFO if args.verbose else logging.WARNING)
    with _terminate_like_interrupt():
        try:
            return args.handler(args)
        except HeteroError as err:
            console.print(f"error: {err}", style="bold red", markup=False, highlight=False)
            return 2
        except KeyboardInterrupt:
            console.print("interrupted; nothing half-written was kept (finished training epochs are checkpointed: "
                          "use --resume)", style="yellow")
            return 130


if __name__ == "__main__":
    sys.exit(main())
