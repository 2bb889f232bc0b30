"""Galleries in a vector database (Milvus, or LanceDB): build, search, change, adopt and migrate a collection.

Building streams the images in batches: decode, embed with the family's member, write the rows (keyed by
the image's name).  A build that stops resumes where it stopped: the names already in the collection are
skipped, and writing a row again replaces it, so no row is ever duplicated.  One builder writes a
collection at a time (a claim in its properties; Milvus Lite also locks its data directory).

After an incompatible change of family (another space id) the collection refuses its queries; `migrate`
re-embeds into a new collection and moves the alias searches use only when that collection is complete,
so a search never sees a half-built one.  A backward-compatible update keeps the space id: its queries
run on the existing collection, with no re-index.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from hetero.family import FamilyStore, MemberRecord
from hetero.gallery.base import GalleryError, member_record
from hetero.gallery.images import ImageFiles, embed_batches, in_batches, list_images
from hetero.gallery.stores import Identity, MilvusStore, StoreError
from hetero.gallery.vectors import prove_space, proven_vectors, unit_rows

BACKENDS = ("milvus", "lance")

# Rows per upsert of a build or an import: each upsert is a merge on the key and a committed version, so a
# database ingests large writes fastest (LanceDB: ~7k rows/s in writes of 1,000 rows, ~70k in writes of 16k).
UPSERT_ROWS = 16_384


def open_store(uri: str, collection: str, backend: str = "milvus", create: bool = False):
    """A collection in Milvus (embedded or a server) or a table in LanceDB (a database folder)."""
    if backend == "lance":
        from hetero.gallery.lance import LanceStore

        return LanceStore(uri, collection, create=create)
    if backend != "milvus":
        raise StoreError(f"--store {backend!r}: a database store is one of {', '.join(BACKENDS)}")
    return MilvusStore(uri, collection, create=create)


def identity_of(store: FamilyStore, entry: MemberRecord) -> Identity:
    return Identity(space_id=store.space_id, family=store.name, member=entry.name, dim=entry.dim)


def _batches(store: FamilyStore, entry: MemberRecord, entries, batch_size: int, workers: int):
    """(names, skipped names, embeddings) per batch of `entries`, decoded as the family decodes."""
    data = store.config().data
    model = store.load_member(entry.name)
    dataset = ImageFiles(entries, store.config().load_size, data.background, data.max_image_pixels)
    with torch.inference_mode():
        for names, skipped, embedded in embed_batches(dataset, in_batches(len(entries), batch_size), model,
                                                      model.input_size, workers):
            yield names, skipped, embedded.numpy() if embedded is not None else np.zeros((0, entry.dim), np.float32)


def build(store: FamilyStore, images: str | Path, uri: str, collection: str = "gallery", *, member: str | None = None,
          batch_size: int = 256, workers: int = 0, overwrite: bool = False, replace: bool = False,
          progress: bool = False, backend: str = "milvus") -> dict:
    """Embed every image under `images` into the collection; return what was done (rows/s included).

    A collection of another space, dimension or metric is refused unless `overwrite` (dropped first).
    Without `replace`, names already in the collection are skipped (a resumed build); with it they are
    embedded and written again (an update of changed images).
    """
    from tqdm import tqdm

    if batch_size < 1 or workers < 0:
        raise StoreError(f"--batch-size must be >= 1 and --workers >= 0 (got {batch_size}, {workers})")
    entry = member_record(store, member)
    identity = identity_of(store, entry)
    entries = list_images(images)
    db = open_store(uri, collection, backend, create=not replace)  # an update needs the database it updates
    _prepare(db, identity, overwrite, len(entries))
    started, written, skipped, kept = time.perf_counter(), 0, [], 0
    with one_writer(db):
        bar = tqdm(total=len(entries), desc=f"writing {collection}", unit="img", disable=not progress, leave=False)
        for begin in range(0, len(entries), UPSERT_ROWS):  # resume: ask the store per block, write it in one go
            block = entries[begin:begin + UPSERT_ROWS]
            present = set() if replace else db.present([e.name for e in block])
            todo = [e for e in block if e.name not in present]
            kept += len(block) - len(todo)
            names, embedded = [], []
            for batch_names, unreadable, batch in _batches(store, entry, todo, batch_size, workers) if todo else ():
                names += batch_names
                embedded += [batch] if batch_names else []
                skipped += unreadable
                bar.update(len(batch_names) + len(unreadable))
            if names:
                db.upsert(names, np.concatenate(embedded))
            written += len(names)
            bar.update(len(block) - len(todo))
            db.claim()  # renew: a claim not renewed for LEASE_SECONDS is another builder's to take
        bar.close()
    seconds = time.perf_counter() - started
    return {"uri": uri, "collection": collection, "space_id": identity.space_id, "member": entry.name,
            "images": len(entries), "written": written, "already_there": kept, "skipped": skipped,
            "rows": db.count(), "seconds": round(seconds, 2),
            "rows_per_s": round(written / seconds, 1) if seconds else 0}


@contextmanager
def one_writer(db):
    """Claim the collection as its one writer, flush (index) what was written, and always give the claim back."""
    db.claim()
    try:
        yield
        db.flush()
    finally:
        db.release()


def _prepare(db, identity: Identity, overwrite: bool, rows_hint: int) -> None:
    if db.exists() and overwrite:
        db.drop()
    if not db.exists():
        db.create(identity, rows_hint)
        return
    found = db.identity()
    if found is None:
        raise StoreError(f"{db.uri} collection {db.name!r} was not written by hetero (no embedding space in its "
                         f"properties); adopt it (`hetero gallery adopt`) or use --overwrite or another --collection")
    differs = [f"{field} {getattr(found, field)!r} (this family: {getattr(identity, field)!r})"
               for field in ("space_id", "dim", "metric") if getattr(found, field) != getattr(identity, field)]
    if differs:
        raise StoreError(f"{db.uri} collection {db.name!r} holds another gallery: {'; '.join(differs)}. Use "
                         f"--overwrite to replace it, another --collection, or `hetero gallery migrate`")


def delete(store: FamilyStore, uri: str, collection: str, ids: list[str], backend: str = "milvus") -> tuple[int, int]:
    """Remove rows by image name; return (rows removed, names that were not there).  Deleting an absent name
    is a no-op, so the same delete can run twice."""
    db = open_store(uri, collection, backend)
    db.check_space(store.space_id, f"family {store.name!r}")
    there = db.present(ids)
    if there:  # Milvus refuses a delete by an empty list of keys
        db.delete(sorted(there))
    return len(there), len(set(ids)) - len(there)


def search(uri: str, collection: str, queries: np.ndarray, k: int, query_space: str | None, label: str,
           nprobe: int | None = None, backend: str = "milvus") -> list[list[tuple[str, float]]]:
    db = open_store(uri, collection, backend)
    db.check_space(query_space, label)  # before any query is sent
    return db.search(queries, k, nprobe)


def adopt(store: FamilyStore, uri: str, collection: str, images: str | Path, *, member: str | None = None,
          sample: int = 64, backend: str = "milvus") -> dict:
    """Stamp a collection another tool wrote with the family's space, once a sample proves it.

    Up to `sample` of the listed images (named as in the collection) are embedded again with the member;
    every stored vector must match its re-embedding at cosine >= 0.999, else nothing is stamped and the
    error says how far off they are.
    """
    entry = member_record(store, member)
    db = open_store(uri, collection, backend)
    if not db.exists():
        raise StoreError(f"{uri}: no collection {collection!r} to adopt")
    _, _, dim = db.fields()
    if dim != entry.dim:
        raise StoreError(f"{uri} collection {collection!r} holds {dim}-d vectors; member {entry.name!r} embeds into "
                         f"{entry.dim} dimensions: these cannot be the same space")
    entries = list_images(images)
    stored = db.vectors([e.name for e in entries])
    try:
        proof = prove_space(store, entry, stored, images, sample)
    except GalleryError as err:
        raise StoreError(f"{collection!r}: {err}") from None
    db.stamp(identity_of(store, entry))
    return {"collection": collection, "checked": proof["checked"], "min_cosine": proof["min_cosine"],
            "space_id": store.space_id}


def import_vectors(store: FamilyStore, vectors: str | Path, images: str | Path, uri: str, collection: str = "gallery",
                   *, ids: str | Path | None = None, member: str | None = None, sample: int = 64,
                   overwrite: bool = False, backend: str = "milvus") -> dict:
    """Vectors the user already has into a collection, once a sample of the images proves their space (as
    `hetero gallery import` does for FAISS files), UPSERT_ROWS at a time: memory stays that of one chunk
    whatever the file's size, and rows are upserted by id, so an import run again after a crash finishes the
    collection without duplicates."""
    entry, source, _, proof = proven_vectors(store, vectors, images, ids=ids, member=member, sample=sample)
    db = open_store(uri, collection, backend, create=True)
    _prepare(db, identity_of(store, entry), overwrite, source.rows)
    started, written = time.perf_counter(), 0
    with one_writer(db):
        for names, matrix in source.chunks(UPSERT_ROWS):
            db.upsert(names, unit_rows(matrix))
            written += len(names)
            db.claim()
    seconds = time.perf_counter() - started
    return {"uri": uri, "collection": collection, "space_id": store.space_id, "member": entry.name,
            "written": written, "rows": db.count(), "seconds": round(seconds, 2),
            "rows_per_s": round(written / seconds, 1) if seconds else 0, "proof": proof}


def migrate(store: FamilyStore, images: str | Path, uri: str, alias: str = "gallery", backend: str = "milvus",
            **options) -> dict:
    """Re-embed the gallery with this family into a new collection, then move `alias` to it.

    Searches go through the alias, so they see the old collection until the new one is complete; a
    migration that stops resumes into the same new collection.  The old collection is kept.  When `alias`
    is a collection's own name (`gallery build` wrote it), that collection is renamed after its space first,
    so the name can become an alias: searches by that name fail between the rename and the alias (one call).
    """
    served = open_store(uri, alias, backend, create=True)  # a first migration may start the database
    if served.exists() and served.space_id == store.space_id:
        raise StoreError(f"{uri} {alias!r} already holds space {store.space_id} (family {store.name!r}); nothing to "
                         f"migrate: `hetero gallery update` re-embeds changed images in place")
    target = _space_collection(alias, store.space_id)
    record = build(store, images, uri, target, backend=backend, **options)
    db = open_store(uri, target, backend)
    if db.count() < record["images"] - len(record["skipped"]):
        raise StoreError(f"{uri} collection {target!r} is incomplete ({db.count()} rows); run migrate again")
    previous = served.collection if served.exists() else None
    if previous == alias:
        previous = _space_collection(alias, served.space_id or "unstamped")
        served.rename(previous)
    db.point_alias(alias)
    return {**record, "alias": alias, "collection": target, "previous": previous}


def _space_collection(alias: str, space_id: str) -> str:
    return f"{alias}_{space_id.replace('-', '_')}"
