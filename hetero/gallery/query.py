"""Searching a gallery: the query model (a torch member of the family or an exported artifact's runtime)
and `search_images`, which embeds query images and asks any gallery store for their nearest items."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from hetero.data import DEFAULT_BACKGROUND, DEFAULT_MAX_PIXELS
from hetero.errors import HeteroError
from hetero.family import FamilyStore
from hetero.gallery.base import GalleryError, member_record
from hetero.gallery.images import ImageFiles, embed_batches, in_batches, list_images
from hetero.gallery.index import Gallery
from hetero.gallery.stores import VectorStore

ESCALATE_BY = ("entropy", "margin")
# Neighbours asked for a query's gallery margin: enough to reach an item of another class past the items of
# the nearest one's (a class with more gallery items than this gets a lower bound of its margin).
MARGIN_NEIGHBOURS = 64


@dataclass
class QueryModel:
    """Anything that embeds query images: a torch member or an exported artifact's runtime."""

    label: str
    space_id: str | None
    input_size: int
    load_size: int
    encode: object  # callable: float32 NCHW images in [0, 1] at input_size -> unit vectors (numpy)
    background: tuple = DEFAULT_BACKGROUND
    max_pixels: int = DEFAULT_MAX_PIXELS
    # An exit chain: images -> (unit vectors, which exit answered each, "stage k" or "cloud"), used instead
    # of `encode`; and what each exit costs, for the summary.
    route: object = None
    exit_mflops: dict | None = None
    # An escalation budget by gallery margin: the budget, the last edge exit's name, and images -> the
    # cloud's unit vectors; search_images decides once it has the edge's neighbours.
    margin_budget: object = None
    last_exit: str | None = None
    escalate: object = None


def open_query_model(store: FamilyStore | None = None, member: str | None = None,
                     artifact: str | Path | None = None, escalate_share: float | None = None,
                     escalate_window: int = 1000, escalate_by: str = "entropy") -> QueryModel:
    """A torch member of the family (the cloud by default), or an exported artifact file.  With an exit
    chain, `escalate_share` sends that share of the queries to the cloud whatever they are like
    (`hetero.maths.EscalationBudget` over the last `escalate_window` queries) instead of the rule's fixed
    threshold, the least sure by the last exit's `entropy` or by the `margin` of its gallery answer."""
    if escalate_share is not None and (artifact is None or not (Path(artifact) / "chain.json").is_file()):
        raise GalleryError(f"--escalate-share {escalate_share:g}: only an exported exit chain escalates queries to "
                           f"the cloud; give --artifact DIR/exports/<profile>/<member>.exits")
    if escalate_by not in ESCALATE_BY:
        raise GalleryError(f"--escalate-by {escalate_by!r}: one of {', '.join(ESCALATE_BY)}")
    if escalate_by != "entropy" and escalate_share is None:
        raise GalleryError(f"--escalate-by {escalate_by}: ranks queries for an escalation budget; give "
                           f"--escalate-share too")
    if artifact is not None and escalate_share is not None:
        return _chain_model(Path(artifact), store, escalate_share, escalate_window, escalate_by)
    if artifact is not None:
        return _artifact_model(Path(artifact), store)
    if store is None:
        raise GalleryError("a query model needs a family directory (for --member) or --artifact FILE")
    entry = member_record(store, member)
    model = store.load_member(entry.name)

    def encode(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(images)).numpy()

    data = store.config().data
    return QueryModel(f"member {entry.name!r} of {store.root}", store.space_id, entry.input_size,
                      store.config().load_size, encode, tuple(data.background), data.max_image_pixels)


def _artifact_model(path: Path, store: FamilyStore | None) -> QueryModel:
    from hetero import formats
    from hetero.profiles import load_profile

    if not path.exists():
        raise GalleryError(f"--artifact {path}: no such file")
    if path.is_dir() and (path / "chain.json").is_file():
        return _chain_model(path, store)
    registered = store.artifact_for_file(path) if store is not None else None
    if registered is not None:
        spec, runtime_name = formats.get(registered.format), load_profile(registered.profile).verify.runtime
    else:
        spec = formats.for_path(path)
        if spec is None:
            raise GalleryError(f"--artifact {path}: cannot tell its format from suffix {path.suffix!r}; known: "
                               f"{', '.join(f.suffix for f in formats.FORMATS.values())}")
        runtime_name = spec.in_process()[0].name
    try:
        runtime = spec.open(path, runtime_name)
        int(runtime.metadata["input_size"])
    except HeteroError:
        raise
    except Exception as err:
        raise GalleryError(f"--artifact {path}: cannot be opened with {runtime_name} ({type(err).__name__}: "
                           f"{str(err).strip()[:300]})") from None
    meta = runtime.metadata
    load_size, background, max_pixels = meta["input_size"], DEFAULT_BACKGROUND, DEFAULT_MAX_PIXELS
    if store is not None:
        data = store.config().data
        load_size, background, max_pixels = store.config().load_size, tuple(data.background), data.max_image_pixels
    return QueryModel(f"artifact {path} ({meta.get('member')}, {runtime.name})", meta.get("space_id"),
                      meta["input_size"], load_size, runtime.embed, background, max_pixels)


def _chain_model(folder: Path, store: FamilyStore | None, escalate_share: float | None = None,
                 escalate_window: int = 1000, escalate_by: str = "entropy") -> QueryModel:
    """A multi-exit member's exported chain as a device runs it: stage by stage, each query stopping at the
    first exit sure enough by the calibrated rule in the chain's metadata; the queries the rule escalates (or,
    with `escalate_share`, the budget) are embedded by the family's cloud member."""
    import json

    from hetero import formats
    from hetero.maths import EscalationBudget

    try:
        first = json.loads((folder / "chain.json").read_text())["stages"][0]["file"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise GalleryError(f"--artifact {folder}: chain.json is not a readable exit chain "
                           f"({type(err).__name__}: {err})") from None
    spec = formats.for_path(first)
    if spec is None or spec.exit_chain_runtime is None:
        raise GalleryError(f"--artifact {folder}: its stages ({first}) are not of a format with exit chains")
    chain = spec.open_exit_chain(folder)
    meta, early = chain.metadata, chain.metadata.get("early_exit") or {}
    exits = early.get("exits") or []
    rule = early.get("rule")
    if rule is None:
        raise GalleryError(f"--artifact {folder}: the chain carries no calibrated exit rule; run `hetero calibrate` "
                           f"on the family, export the member again, and search with the new chain (or search "
                           f"with --member {meta.get('member')} for its last exit alone)")
    budget = None
    if escalate_share is not None:
        try:
            start = rule.get("escalate_above") if escalate_by == "entropy" else None  # calibrated on entropy
            budget = EscalationBudget(escalate_share, start, escalate_window)
        except ValueError as err:
            raise GalleryError(f"--escalate-share {escalate_share:g} --escalate-window {escalate_window}: {err}") \
                from None
    escalates = rule.get("escalate_above") is not None or budget is not None
    if escalates and store is None:
        raise GalleryError(f"--artifact {folder}: its rule sends the least sure queries to the cloud member, which "
                           f"needs the family directory")
    cloud = store.load_member(store.cloud.name) if escalates else None
    names = [f"stage {e['stage']}" for e in exits] + ["cloud"]

    def route(images: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """`images` at the size they were loaded at: the chain and the cloud each resize them to their own,
        as a device sends the cloud the image it has, not the one its own model saw."""
        from hetero.models import resize_to

        pixels = torch.from_numpy(images)
        on_device = resize_to(pixels, int(meta["input_size"])).numpy()
        fixed = rule.get("escalate_above") if budget is None else None
        chosen, vectors, entropies = chain.run_chain(on_device, rule["thresholds"], fixed)
        if budget is not None and escalate_by == "entropy":
            chosen[budget(torch.from_numpy(entropies[:, -1])).numpy()] = len(exits)
        sent = np.nonzero(chosen == len(exits))[0]
        if len(sent):
            vectors[sent] = by_cloud(images[sent])
        return vectors, [names[c] for c in chosen]

    def by_cloud(images: np.ndarray) -> np.ndarray:
        from hetero.models import resize_to

        with torch.inference_mode():
            return cloud(resize_to(torch.from_numpy(images), cloud.input_size)).numpy()

    load_size, background, max_pixels = meta["input_size"], DEFAULT_BACKGROUND, DEFAULT_MAX_PIXELS
    if store is not None:
        data = store.config().data
        load_size, background, max_pixels = store.config().load_size, tuple(data.background), data.max_image_pixels
    mflops = {f"stage {e['stage']}": e["flops"] / 1e6 for e in exits}
    escalation = "" if not escalates else f", escalating to {store.cloud.name!r}" + (
        "" if budget is None else f" {budget.share:.0%} of the last {budget.window} queries by {escalate_by}")
    return QueryModel(f"exit chain {folder} ({meta.get('member')}, {chain.name}{escalation})", meta.get("space_id"),
                      load_size, load_size, lambda images: route(images)[0], background, max_pixels, route, mflops,
                      budget if escalate_by == "margin" else None, names[len(exits) - 1], by_cloud)


def search_images(gallery: VectorStore | str | Path, images: str | Path, model: QueryModel, k: int = 5,
                  batch_size: int = 64, nprobe: int | None = None) -> list[dict]:
    """Embed every image under `images` with `model` and return its k nearest gallery items.

    `gallery` is a FAISS gallery (a Gallery or its directory) or any other
    :class:`~hetero.gallery.stores.VectorStore` (a Milvus collection, :class:`hetero.gallery.stores.MilvusStore`);
    the space is checked before any image is read.
    """
    gallery = Gallery(gallery) if isinstance(gallery, (str, Path)) else gallery
    gallery.check_space(model.space_id, model.label)
    entries = list_images(images)
    dataset = ImageFiles(entries, model.load_size, model.background, model.max_pixels)
    results, answered, pixels = [], [], []

    def encode(batch: torch.Tensor) -> np.ndarray:
        if model.route is None:
            return model.encode(batch.numpy())
        vectors, exits = model.route(batch.numpy())
        answered[:], pixels[:] = exits, [batch.numpy()]  # the batch embed_batches yields next
        return vectors

    wide = max(k, MARGIN_NEIGHBOURS) if model.margin_budget is not None else k
    for names, skipped, embedded in embed_batches(dataset, in_batches(len(entries), batch_size), encode,
                                                  model.input_size):
        results += [{"query": name, "skipped": True, "results": []} for name in skipped]
        if embedded is None:
            continue
        found = gallery.nearest(embedded, wide, model.space_id, model.label, nprobe)
        exits = list(answered) if model.route is not None else [None] * len(names)
        if model.margin_budget is not None:
            sent = model.margin_budget(unsure_by_margin(found, exits, model.last_exit))
            if sent.any():
                rows = torch.nonzero(sent).flatten().tolist()
                again = gallery.nearest(model.escalate(pixels[0][rows]), k, model.space_id, model.label, nprobe)
                for row, hits in zip(rows, again):
                    found[row], exits[row] = hits, "cloud"
        results += [{"query": name, "results": hits[:k], **({"exit": where} if where else {})}
                    for name, hits, where in zip(names, found, exits)]
    return results


def unsure_by_margin(found: list[list[dict]], exits: list[str], last_exit: str) -> torch.Tensor:
    """Per query, minus its gallery margin (`hetero.maths.gallery_margin`), the classes of the items being
    their folders; NaN for a query answered before the last exit."""
    from hetero.maths import gallery_margin

    width = max((len(hits) for hits in found), default=0)
    if width == 0:  # an empty gallery: no answer to be unsure of
        return torch.full((len(found),), torch.nan)
    scores = torch.full((len(found), width), -torch.inf)
    same = torch.ones(len(found), width, dtype=torch.bool)
    for row, hits in enumerate(found):
        classes = [PurePosixPath(hit["name"]).parent for hit in hits]
        if hits and classes[0] == PurePosixPath("."):
            raise GalleryError(f"--escalate-by margin: gallery item {hits[0]['name']!r} is in no class folder; the "
                               f"margin needs the gallery's images in one folder per class")
        scores[row, :len(hits)] = torch.tensor([hit["score"] for hit in hits])
        same[row, :len(hits)] = torch.tensor([c == classes[0] for c in classes])
    unsure = -gallery_margin(scores, same)
    return torch.where(torch.tensor([where == last_exit for where in exits]), unsure, torch.nan)


def exit_summary(results: list[dict], model: QueryModel) -> dict | None:
    """For a chain's search: the share of queries each exit answered, the share sent to the cloud, and the
    mean edge MFLOPs per query (an escalated query ran every stage first); None for other query models."""
    answered = [r["exit"] for r in results if "exit" in r]
    if model.route is None or not answered:
        return None
    costs = model.exit_mflops or {}
    last = max(costs.values(), default=0.0)
    shares = {where: answered.count(where) / len(answered) for where in [*costs, "cloud"]}
    mean = sum(costs.get(where, last) for where in answered) / len(answered)
    return {"queries": len(answered), "shares": shares, "mean_edge_mflops": mean}
