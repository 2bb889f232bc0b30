"""The export stage: one member of a family, converted for one device profile and registered in its manifest.

The converters live in `hetero.export` (one module per format) and are reached through the format registry
(`hetero.formats`), so this stage, like verify and gallery, never names a converter module itself.
"""
from __future__ import annotations

import time
from pathlib import Path

from hetero import formats, runtimes
from hetero.errors import ExportError
from hetero.family import ArtifactRecord, FamilyStore, MemberRecord
from hetero.files import atomic_folder, path_bytes, sha256_path


def budget_problems(entry: MemberRecord, profile, file_bytes: int | None = None) -> list[str]:
    """Every budget of the profile the member exceeds, with the figure and the budget."""
    budgets, problems = profile.budgets, []
    if budgets.max_params is not None and entry.params > budgets.max_params:
        problems.append(f"params {entry.params:,} > budget {budgets.max_params:,}")
    if budgets.max_mflops is not None and entry.flops / 1e6 > budgets.max_mflops:
        problems.append(f"MFLOPs {entry.flops / 1e6:.1f} > budget {budgets.max_mflops:g}")
    if budgets.max_file_mb is not None and file_bytes is not None and file_bytes / 2**20 > budgets.max_file_mb:
        problems.append(f"file size {file_bytes / 2**20:.2f} MB > budget {budgets.max_file_mb:g} MB")
    return problems


def choose_member(store: FamilyStore, profile) -> str:
    """The member `hetero search` chose for the profile, else the most accurate edge member (M[edge][cloud]
    top-1) that fits the profile's budgets."""
    edges = store.edges
    searched = [m for m in edges if (m.search or {}).get("profile") == profile.name]
    if searched:
        return max(searched, key=lambda m: m.search["validation_top1"]).name
    fitting = [m for m in edges if not budget_problems(m, profile) and profile.input_size in (None, m.input_size)]
    if not fitting:
        raise ExportError(f"no edge member of {store.name!r} fits profile {profile.name!r}: " + "; ".join(
            f"{m.name}: {', '.join(budget_problems(m, profile)) or 'input size differs'}" for m in edges))
    compatibility = store.manifest.compatibility
    scores = compatibility.edges if compatibility else {}
    # Without an evaluation, prefer the largest member that fits (more FLOPs, usually more accurate).
    return max(fitting, key=lambda m: (scores.get(m.name, {}).get("edge_vs_cloud_top1", -1), m.flops)).name


def check_converter(profile) -> None:
    """Fail early, with the extra to install, when the profile's converter packages are missing."""
    spec = formats.get(profile.format)
    missing = spec.missing_packages()
    if missing:
        raise ExportError(f"profile {profile.name!r} exports {profile.format} files with {missing[0]}, which is not "
                          f"installed in this Python environment. Install it with: {spec.install_hint()}")


def calibration_images(store: FamilyStore, size: int, count: int):
    """`count` training images (never held-out classes), spread evenly over the split, at `size` px."""
    from hetero.models import resize_to

    return resize_to(store.split().train.spread(count), size)


def exit_gate_images(store: FamilyStore, entry: MemberRecord, count: int):
    """`count` images a multi-exit chain's export gate compares exits on: those the exit rule was fitted on
    (the training images held out of training, classes the member never saw when held out by class),
    spread evenly; training images when none were held out.  Images the member trained on are sure at the
    first exits, so few of them sit near a threshold, where a lower precision moves a query's exit; unseen
    classes, like a user's queries, put more there."""
    from hetero.data import calibration_split
    from hetero.models import resize_to

    config, train = store.config(), store.split().train
    held_out_by = (entry.early_exit or {}).get("held_out_by", "images")
    _, held = calibration_split(train, config.train.early_exit.held_out, held_out_by, config.data.split_seed)
    if len(held) == 0:
        return calibration_images(store, entry.input_size, count)
    return resize_to(train.subset(held).spread(count), entry.input_size)


def needs_calibration(profile) -> bool:
    """Static int8 (activations too) needs real images to set the activation ranges."""
    return profile.precision == "int8"


def runtime_gate(store: FamilyStore, entry: MemberRecord, profile, model, announce=None):
    """(accept, checked, unchecked): accept(file) is None when the file keeps parity on every isolated runtime
    the profile declares, else says where it does not; checked labels the runtimes it is held to, unchecked
    the declared ones that could not be had here, with why.

    The converter's own parity gate covers the runtime in this process; an isolated runtime (an older
    release devices still run) is checked here, on training images not used for calibration, in an
    environment created on first use.  One that cannot be created (no network) does not stop the export: it
    is recorded as unchecked, and verify reports its checks as skipped.
    """
    from hetero.export.common import keeps_parity, parity

    not_created = runtimes.provide(profile, announce)
    targets = runtimes.targets(profile)
    unchecked = [f"{t.requirement}: {not_created.get(t.requirement, t.missing)}" for t in targets if t.missing]
    targets = [t for t in targets if not t.missing]
    isolated = [t for t in targets if t.environment is not None]
    held = calibration_images(store, entry.input_size, profile.calibration_images)[1::2] if isolated else None
    spec = formats.get(profile.format)

    def accept(candidate: Path) -> str | None:
        for target in isolated:
            try:
                adapter = target.open(spec, candidate)
                try:
                    check = parity(adapter, model, held)
                finally:
                    adapter.close()
            except ExportError as err:  # it cannot load or run the file: that scheme does not hold there
                return f"on {target.label}: cannot load or run it ({' '.join(str(err).split())[:300]})"
            if not keeps_parity(check, profile.tolerances.min_cosine):
                return f"on {target.label}: min cosine {check['min_cosine']:.4f} ({check['images']} images)"
        return None

    return accept, [t.label for t in targets], unchecked


def artifact_metadata(store: FamilyStore, entry: MemberRecord, profile) -> dict:
    """What every exported file carries about itself, in its format's own metadata slot."""
    data = store.config().data
    return {
        "space_id": store.space_id, "family": store.name, "family_version": store.manifest.version,
        "member": entry.name, "role": entry.role, "embedding_dim": entry.dim,
        "input_size": entry.input_size, "layout": profile.layout, "mean": entry.mean, "std": entry.std,
        "input_range": [0.0, 1.0], "precision": profile.precision, "profile": profile.name,
        "format": profile.format, "batch": profile.batch,
        # How images were prepared in training and for the gallery; a device decoding photos should match it.
        "preprocessing": {"colour_order": "RGB", "resize": "bicubic to the load size, then bilinear (antialiased) "
                                                          "to input_size",
                          "transparency": f"composited onto RGB {list(data.background)}",
                          "high_bit_depth": "16-bit greyscale scaled 0..65535 -> 0..255"},
    }


def export_member(store: FamilyStore, member: str | None, profile, allow_over_budget: bool = False,
                  calibration=None, verbose: bool = False, announce=None) -> ArtifactRecord:
    """Export one member (chosen automatically when None) for `profile`; register it in the manifest.

    The caller holds the family's lock (`store.lock("export")`); `announce(text)` hears of slow first-use
    steps (creating a runtime environment).
    """
    from hetero.export.common import converter_output

    member = member or choose_member(store, profile)
    entry = store.member(member)
    if entry.kind == "external":
        raise ExportError(f"member {member!r} is the external cloud ({entry.arch}, {entry.checkpoint.file}): it is "
                          f"your own model and is not exported; export the edge members")
    if profile.input_size not in (None, entry.input_size):
        raise ExportError(f"member {member!r} takes {entry.input_size} px but profile {profile.name!r} feeds "
                          f"{profile.input_size} px; pick a member trained at that size")
    problems = budget_problems(entry, profile)
    if problems and not allow_over_budget:
        raise ExportError(f"member {member!r} exceeds the budgets of profile {profile.name!r}: "
                          f"{'; '.join(problems)}. Use --allow-over-budget to export anyway (it is recorded).")
    spec = formats.get(profile.format)
    if entry.kind == "multi-exit" and spec.exit_chain is None:
        spec.exit_chain_function(profile.name)  # no chained export for this format: says which formats have one
    check_converter(profile)
    if entry.kind == "multi-exit":
        return _export_exit_chain(store, entry, profile, spec, problems, verbose, announce)
    exporter = spec.export_function()
    model = store.load_member(member)
    metadata = artifact_metadata(store, entry, profile)
    path = store.path(f"exports/{profile.name}/{member}{spec.suffix}", "export path")
    started = time.perf_counter()
    if needs_calibration(profile):
        from hetero.models import resize_to

        calibration = (calibration_images(store, entry.input_size, profile.calibration_images)
                       if calibration is None else resize_to(calibration, entry.input_size))
    accept, declared, unchecked = runtime_gate(store, entry, profile, model, announce)
    with atomic_folder(path) as tmp:
        failure = None
        with converter_output(verbose) as output:
            try:
                done = exporter(model, tmp, profile, metadata, calibration, accept)
                refused = accept(tmp) if tmp.exists() else None  # the final file, on every isolated runtime
            except ExportError:
                raise
            except Exception as err:  # a converter failing on an op: one clear paragraph, no half-written file
                failure = err
        if failure is not None:
            raise _conversion_failed(failure, member, profile, spec, output, verbose) from failure
        if not tmp.exists():
            raise ExportError(f"the {profile.format} converter wrote nothing for {path}")
        if refused is not None:
            raise ExportError(f"member {member!r} for profile {profile.name!r} ({profile.format} {profile.precision}) "
                              f"does not keep parity {refused}; nothing was written")
        file_bytes = path_bytes(tmp)
        problems += budget_problems(entry, profile, file_bytes)[len(problems):]
        if problems and not allow_over_budget:
            raise ExportError(f"member {member!r} exceeds the budgets of profile {profile.name!r}: "
                              f"{'; '.join(problems)}. Use --allow-over-budget to export anyway (it is recorded).")
    artifact = ArtifactRecord(
        member=member, profile=profile.name, format=profile.format, precision=profile.precision,
        layout=profile.layout, file=path.relative_to(store.root).as_posix(), sha256=sha256_path(path),
        bytes=file_bytes, export_seconds=round(time.perf_counter() - started, 2), over_budget=problems,
        checked_on=declared, unchecked_on=unchecked, **done, **kept_profile(store, profile))
    store.register_artifact(artifact)
    return artifact


def kept_profile(store: FamilyStore, profile) -> dict:
    """A profile that is not built in (a file the user gave) is copied beside its exports: later verifies of
    the family, bundles and the pytest plugin read it there, wherever the file went."""
    from dataclasses import asdict

    import yaml

    from hetero.files import atomic_write_text
    from hetero.profiles import builtin_profile_files, read_profile

    builtin = builtin_profile_files().get(profile.name)
    if builtin is not None and read_profile(builtin) == profile:
        return {}
    path = store.path(f"exports/{profile.name}/profile.yaml", "profile copy")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(asdict(profile), sort_keys=False))
    return {"profile_file": path.relative_to(store.root).as_posix()}


def exit_metadata(entry: MemberRecord) -> dict:
    """What a device needs to run a multi-exit chain: per exit its stage and FLOPs, the anchors' origin and
    temperatures, and the calibrated rule (thresholds, escalation), or None before `hetero calibrate`."""
    early = entry.early_exit or {}
    return {"exits": [e.model_dump() for e in entry.exits], "anchors": early.get("anchors"),
            "temperatures": early.get("temperatures"), "rule": early.get("rule")}


def _export_exit_chain(store: FamilyStore, entry: MemberRecord, profile, spec, problems: list[str],
                       verbose: bool = False, announce=None) -> ArtifactRecord:
    """A multi-exit member as chained stage graphs plus an all-exits graph, in one folder (see the format's
    exit_chain exporter); checked on every runtime the profile declares, exit by exit and for the exit its
    chained run stops at, before it is registered.  A runtime that cannot run here (CoreML off macOS) leaves
    the chain unchecked on it, and verify says so."""
    import shutil

    from hetero.export.common import INT8_SCOPES, converter_output

    exporter = spec.exit_chain_function(profile.name)
    model = store.load_member(entry.name)
    metadata = {**artifact_metadata(store, entry, profile), "early_exit": exit_metadata(entry)}
    path = store.path(f"exports/{profile.name}/{entry.name}.exits", "export path")
    images = exit_gate_images(store, entry, max(32, profile.calibration_images))
    not_created = runtimes.provide(profile, announce)
    targets = runtimes.targets(profile)
    unchecked = [f"{t.requirement}: {not_created.get(t.requirement, t.missing)}" for t in targets if t.missing]
    targets = [t for t in targets if not t.missing]
    rule = metadata["early_exit"]["rule"]
    started = time.perf_counter()

    def write(folder: Path, **options) -> dict:
        failure = None
        with converter_output(verbose) as output:
            try:
                return exporter(model, folder, profile, metadata, **options)
            except ExportError:
                raise
            except Exception as err:  # a converter failing on an op: one clear paragraph, no half-written folder
                failure = err
        raise _conversion_failed(failure, entry.name, profile, spec, output, verbose) from failure

    with atomic_folder(path) as tmp:
        done = write(tmp)
        refused, checked, unrun = _chain_gate(targets, spec, tmp, model, images, profile, rule)
        tried = []
        # As single graphs do: an int8 scheme that holds, else refuse.  Fewer int8 weights each time, the last
        # try leaving every exit decision but the last to float32 stages (INT8_SCOPES).
        for scope in INT8_SCOPES[1:] if profile.precision.startswith("int8") else ():
            if not refused:
                break
            tried.append(f"int8 weights {'everywhere' if not tried else 'in the ' + INT8_SCOPES[len(tried)]}: "
                         f"{refused}")
            shutil.rmtree(tmp)
            done = write(tmp, int8_scope=scope)
            done["quantization"].update(fallback_from="int8-weights everywhere", fallback_reason="; ".join(tried))
            refused, checked, unrun = _chain_gate(targets, spec, tmp, model, images, profile, rule)
        if refused:
            tried.append(f"int8 weights in the {INT8_SCOPES[-1]}: {refused}" if tried else refused)
            raise ExportError(f"member {entry.name!r} for profile {profile.name!r} ({profile.format} "
                              f"{profile.precision}): {'; '.join(tried)}; nothing was written")
        file_bytes = path_bytes(tmp)
    artifact = ArtifactRecord(
        member=entry.name, profile=profile.name, format=profile.format, precision=profile.precision,
        layout=profile.layout, file=path.relative_to(store.root).as_posix(), sha256=sha256_path(path),
        bytes=file_bytes, export_seconds=round(time.perf_counter() - started, 2), over_budget=problems,
        checked_on=checked, unchecked_on=unchecked + unrun, **done, **kept_profile(store, profile))
    store.register_artifact(artifact)
    return artifact


def _chain_gate(targets, spec, folder: Path, model, images, profile, rule) -> tuple[str | None, list[str], list[str]]:
    """(why the chain fails verify's parity gate on the first runtime where it does, or None; the runtimes it
    was checked on; "runtime: why" for those it cannot run on here)."""
    checked, unrun = [], []
    for target in targets:
        try:
            chain = target.open_chain(spec, folder)
        except ExportError as err:  # it cannot load or run the graphs (a worker that fails): does not hold there
            return f"on {target.label}: cannot load or run it ({' '.join(str(err).split())[:300]})", checked, unrun
        try:
            if chain.unavailable:
                unrun.append(f"{target.label}: {chain.unavailable}")
                continue
            refused = _chain_refusal(chain, model, images, profile, rule)
        finally:
            chain.close()
        if refused:
            return (f"on {target.label}: {refused}" if len(targets) > 1 else refused), checked, unrun
        checked.append(target.label)
    return None, checked, unrun


def _chain_refusal(chain, model, images, profile, rule: dict | None) -> str | None:
    """Why an exported chain would fail verify's parity check (each exit's cosine to torch, and with a
    calibrated rule the exit its chained run stops at), on `exit_gate_images`; None when it holds."""
    import torch

    from hetero.export.common import EXIT_AGREEMENT, chain_exit_agreement, cosine_rows

    with torch.no_grad():
        reference = torch.stack(model.forward_exits(images), dim=1).numpy()
    ours = chain.exits(images.numpy())[0]
    low = min(float(cosine_rows(ours[:, k], reference[:, k]).min()) for k in range(reference.shape[1]))
    if low < profile.tolerances.min_cosine:
        return f"an exit's cosine to torch falls to {low:.4f} (tolerance {profile.tolerances.min_cosine})"
    if rule is not None:
        agreement, _ = chain_exit_agreement(chain, model, images, rule)
        if agreement < EXIT_AGREEMENT:
            return (f"its chained run stops at torch's exit for {agreement:.1%} of the {len(images)} images checked "
                    f"(verify needs {EXIT_AGREEMENT:.0%})")
    return None


def _conversion_failed(err: Exception, member: str, profile, spec, output, verbose: bool) -> ExportError:
    if isinstance(err, ModuleNotFoundError):
        return ExportError(f"profile {profile.name!r} needs {err.name}, which is not installed. Install it with: "
                           f"{spec.install_hint()}")
    said = "" if verbose or not output.tail() else \
        f"\nThe converter's last output (all of it with `hetero -v`):\n{output.tail()}"
    return ExportError(f"exporting member {member!r} for profile {profile.name!r} ({profile.format} "
                       f"{profile.precision}) failed in the converter: {type(err).__name__}: "
                       f"{' '.join(str(err).split())[:800].rstrip('.')}. Nothing was written; the member may use an "
                       f"op this converter does not support.{said}")
