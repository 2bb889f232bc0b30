"""The pipeline verbs (run, train, search, eval, calibrate, export, verify, profiles) and the library-level
helpers they share (train_family, evaluate_family, export_family, verify_family, verify_bundle_file), which
run one stage and print what it did.
"""
from __future__ import annotations

from rich.markup import escape

from hetero.cli.progress import LogLines, console
from hetero.latency import LATENCY_RUNS


def train_family(config_path: str, out: str, *, resume: bool = False, overwrite: bool = False,
                 quiet: bool = False, lines: LogLines | None = None, overrides: list[str] = ()):
    from hetero import distributed
    from hetero.config import load_config
    from hetero.training import train

    lines = lines or LogLines(quiet)
    store = train(load_config(config_path, overrides), out, resume=resume, overwrite=overwrite, progress=not quiet,
                  callbacks=[lines.epoch])
    if distributed.is_main():  # under torchrun, rank 0 speaks for all
        data = store.manifest.data
        console.print(f"trained family [bold]{escape(store.name)}[/] (space id {store.space_id}) into "
                      f"{escape(str(out))}; {data.train_images} training images, {len(data.skipped_images)} "
                      f"unreadable skipped")
    return store


def evaluate_family(store) -> dict:
    from hetero.cli.tables import (format_backward, format_early_exit, format_edges, format_label_free,
                                   format_report)
    from hetero.evaluate import evaluate

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
            artifact = export_member(store, member, profile, allow_over_budget=allow_over_budget, verbose=verbose,
                                     announce=lambda text: console.print(text, highlight=False, markup=False))
            artifacts.append(artifact)
            progress.update(task, advance=1, refresh=True)
            console.print(f"exported {artifact.member} for {profile.name}: {artifact.file} "
                          f"({artifact.bytes / 2**20:.2f} MB, {artifact.export_seconds} s)", highlight=False)
            for unchecked in artifact.unchecked_on:
                # a runtime of another platform (a CoreML chain off macOS) cannot be added here
                remedy = ("run `hetero verify` on the family directory on a Mac" if "only on macOS" in unchecked
                          else "`hetero runtimes add` it, then export again")
                console.print(f"[yellow]not checked on {escape(unchecked)}[/]; verify reports it as skipped "
                              f"({remedy})", highlight=False)
    return artifacts


def verify_family(store, *, profile: str | None = None, images: int | None = None,
                  latency_runs: int = LATENCY_RUNS, strict: bool = False, all_runtimes: bool = False,
                  junit: str | None = None, report_file: str | None = None, bundle: str | None = None) -> int:
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


def verify_bundle_file(bundle: str, *, latency_runs: int = LATENCY_RUNS, strict: bool = False,
                       json_out: str | None = None, all_runtimes: bool = False, junit: str | None = None,
                       report_file: str | None = None) -> int:
    from hetero.verify.bundle import verify_bundle

    report = verify_bundle(bundle, latency_runs=latency_runs, strict=strict, json_out=json_out,
                           all_runtimes=all_runtimes)
    if not report["artifacts"]:
        from hetero.verify.bundle import BundleError

        raise BundleError(f"{bundle}: the bundle holds no artifacts to verify")
    return _verdict(report, report["json"], junit, report_file, None)


def _verdict(report: dict, where: str, junit: str | None, report_file: str | None, bundle: str | None) -> int:
    from hetero.cli.tables import format_summary, format_verify
    from hetero.verify.report import write_junit

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
        elsewhere = sorted({c["values"]["needs_platform"] for a in report["artifacts"] for c in a["checks"]
                            if c["status"] == "skip" and "needs_platform" in c.get("values", {})})
        if elsewhere:
            console.print(f"{counts.get('skip_platform', 0)} of them run only on {', '.join(elsewhere)}: run the same "
                          f"`hetero verify` there (or make a bundle here with --bundle FILE and verify it there with "
                          f"`hetero verify --bundle FILE --strict`)", highlight=False)
        if report.get("strict") and counts["skip"] > counts.get("skip_platform", 0):
            console.print("[bold red]--strict: skipped checks fail the verification[/] (those only another platform "
                          "can run excepted)")
            return 1
    console.print(f"[green]all {counts['pass']} run check(s) of {len(report['artifacts'])} artifact(s) passed[/]")
    return 0


# ---------------------------------------------------------------------------------------------- handlers


def open_family(directory: str):
    from hetero.family import FamilyStore

    return FamilyStore.open(directory)


def cmd_run(args) -> int:
    from hetero.config import load_config
    from hetero.profiles import load_profile

    lines = LogLines(args.quiet)
    # every export profile is resolved before training, the longest stage: a typo in a name fails at once
    profiles = [load_profile(name) for name in load_config(args.config, args.overrides).export.profiles]
    lines.say("hetero run: stage 1/4, train")
    store = train_family(args.config, args.out, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet,
                         lines=lines, overrides=args.overrides)
    lines.say("hetero run: stage 2/4, eval")
    evaluate_family(store)
    lines.say("hetero run: stage 3/4, export")
    export_family(store, profiles, [m.name for m in store.edges], verbose=args.verbose, quiet=args.quiet)
    lines.say("hetero run: stage 4/4, verify")
    return verify_family(store)


def cmd_train(args) -> int:
    train_family(args.config, args.out, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet,
                 overrides=args.overrides)
    return 0


def cmd_search(args) -> int:
    from hetero.cli.tables import format_search
    from hetero.config import load_config
    from hetero.search import search

    lines = LogLines(args.quiet)  # in a log: one line per supernet and fine-tuning epoch
    store = search(load_config(args.config, args.overrides), args.out, resume=args.resume, overwrite=args.overwrite,
                   progress=not args.quiet, callbacks=[lines.epoch])
    console.print(format_search(store))
    console.print(f"Pareto fronts and plots: {escape(str(store.root / 'search'))}; next: hetero eval {escape(args.out)}")
    return 0


def cmd_eval(args) -> int:
    evaluate_family(open_family(args.dir))
    return 0


def cmd_calibrate(args) -> int:
    from hetero.errors import CalibrationError
    from hetero.training.exits import calibrate, check_calibration_target, refit_kmeans_anchors

    store = open_family(args.dir)
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
    if args.kmeans_anchors is not None:  # the target checked before the checkpoint is rewritten
        check_calibration_target(args.top1_loss, args.mean_mflops, args.escalate, thresholds)
        if not 2 <= args.kmeans_anchors <= 4096:
            raise CalibrationError(f"--kmeans-anchors {args.kmeans_anchors}: give between 2 and 4096 centres")
        facts = refit_kmeans_anchors(store, member, args.kmeans_anchors)
        console.print(f"{escape(member)}: {facts['anchors']['count']} anchors, {facts['anchors']['source']}; "
                      f"checkpoint written again (export the member again)", highlight=False)
    rule = calibrate(store, member, args.top1_loss, args.mean_mflops, args.escalate, thresholds, args.per_exit)
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


def cmd_export(args) -> int:
    from hetero.profiles import all_profiles, load_profile

    store = open_family(args.dir)
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


def cmd_verify(args) -> int:
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
    return verify_family(open_family(args.dir), profile=args.profile, images=args.images,
                         latency_runs=args.latency_runs, strict=args.strict, all_runtimes=args.all_runtimes,
                         junit=args.junit, report_file=args.report, bundle=args.bundle)


def cmd_profiles(args) -> int:
    from dataclasses import asdict

    import yaml

    from hetero.cli.tables import format_profiles
    from hetero.errors import ConfigError
    from hetero.profiles import all_profiles, load_profile

    if args.action == "show":
        if not args.name:
            raise ConfigError("`hetero profiles show` needs a profile NAME (or the path of a profile .yaml)")
        console.print(yaml.safe_dump(asdict(load_profile(args.name)), sort_keys=False), markup=False)
        return 0
    console.print(format_profiles(all_profiles()))
    return 0
