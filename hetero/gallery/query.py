"""Searching a gallery: the query model (a torch member of the family or an exported artifact's runtime)
and `search_images`, which embeds query images and asks any gallery store for their nearest items."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hetero.data import DEFAULT_BACKGROUND, DEFAULT_MAX_PIXELS
from hetero.errors import HeteroError
from hetero.family import FamilyStore
from hetero.gallery.base import GalleryError, member_record
from hetero.gallery.images import ImageFiles, embed_batches, in_batches, list_images
from hetero.gallery.index import Gallery
from hetero.gallery.stores import VectorStore


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


def open_query_model(store: FamilyStore | None = None, member: str | None = None,
                     artifact: str | Path | None = None) -> QueryModel:
    """A torch member of the family (the cloud by default), or an exported artifact file."""
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
    results = []
    for names, skipped, embedded in embed_batches(dataset, in_batches(len(entries), batch_size),
                                                  lambda batch: model.encode(batch.numpy()), model.input_size):
        results += [{"query": name, "skipped": True, "results": []} for name in skipped]
        if embedded is None:
            continue
        found = gallery.nearest(embedded, k, model.space_id, model.label, nprobe)
        results += [{"query": name, "results": hits} for name, hits in zip(names, found)]
    return results
