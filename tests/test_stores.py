"""One suite for every gallery store (`hetero.gallery.stores.VectorStore`): FAISS files, a Milvus collection
(embedded Milvus Lite, when pymilvus and milvus-lite are installed) and a LanceDB table (when lancedb is)
built from the same images hold the same rows, give the same answers, and refuse a query from another space
before any search runs."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from hetero import gallery as G
from hetero.family import FamilyStore
from hetero.gallery.stores import StoreSpaceMismatch, VectorStore
from tests.test_gallery import gallery_images  # noqa: F401  (fixture)

MILVUS = all(importlib.util.find_spec(name) is not None for name in ("pymilvus", "milvus_lite"))
LANCE = importlib.util.find_spec("lancedb") is not None
BACKENDS = ["faiss", pytest.param("milvus", marks=pytest.mark.skipif(
    not MILVUS, reason="Milvus needs pymilvus and milvus-lite (pip install hetero[milvus])")),
            pytest.param("lance", marks=pytest.mark.skipif(not LANCE, reason="LanceDB needs lancedb (hetero[lance])"))]
FOREIGN = "hs-0123456789abcdef"
# the members of the VectorStore protocol: a backend may hold them as methods, properties or attributes
PROTOCOL = ("space_id", "count", "check_space", "nearest")


def reference_rows(family_dir: Path, folder: Path) -> tuple[list[str], np.ndarray]:
    """Every image under `folder` embedded by the cloud member in one pass (no store, no loader)."""
    from hetero.data import decode_image
    from hetero.models import embed_images

    store = FamilyStore.open(family_dir)
    size = store.config().load_size
    paths = sorted(folder.rglob("*.png"), key=lambda p: p.relative_to(folder).as_posix())
    images = torch.stack([torch.from_numpy(decode_image(p.read_bytes(), size)).permute(2, 0, 1) for p in paths])
    with torch.inference_mode():
        rows = embed_images(store.load_member("cloud"), images.float() / 255.0, 8)
    return [p.relative_to(folder).as_posix() for p in paths], rows.numpy()


@pytest.fixture(scope="module", params=BACKENDS)
def built(request, tiny_family_dir, gallery_images, tmp_path_factory):  # noqa: F811
    """(backend, where) of a gallery of `gallery_images` embedded by the cloud member, built once per backend."""
    family = FamilyStore.open(tiny_family_dir)
    where = tmp_path_factory.mktemp(f"store-{request.param}")
    if request.param == "faiss":
        G.build_gallery(family, gallery_images, where / "g", shard_size=16, batch_size=8)
        return request.param, where / "g"
    from hetero.gallery import db as gallery_db

    gallery_db.build(family, gallery_images, str(where / "g.db"), "g", batch_size=8, backend=request.param)
    return request.param, str(where / "g.db")


@pytest.fixture
def store(built) -> VectorStore:
    backend, where = built
    if backend == "faiss":
        return G.Gallery(where)
    from hetero.gallery.db import open_store

    return open_store(where, "g", backend)


def forbid_search(store, monkeypatch) -> None:
    """Make the backend's own search fail the test: a refused query must never reach it."""
    def searched(*args, **kwargs):
        pytest.fail("the store searched for a query from another space")

    if isinstance(store, G.Gallery):
        monkeypatch.setattr(G.Gallery, "index", property(searched))  # FAISS: loading the index is the search
    elif hasattr(store, "client"):
        monkeypatch.setattr(store.client, "search", searched)  # Milvus
    else:
        monkeypatch.setattr(type(store.table()), "search", searched)  # LanceDB


def test_every_store_offers_the_protocol(store, tiny_family_dir, gallery_images):  # noqa: F811
    from inspect import getattr_static

    missing = [name for name in PROTOCOL if getattr_static(store, name, None) is None]
    assert not missing, f"{type(store).__name__} lacks {missing}"
    assert store.space_id == FamilyStore.open(tiny_family_dir).space_id
    assert store.count() == len(list(gallery_images.rglob("*.png")))


def test_the_same_rows_give_the_same_answers(store, tiny_family_dir, gallery_images):  # noqa: F811
    names, rows = reference_rows(tiny_family_dir, gallery_images)
    queries = rows[::3] + 0.05 * np.random.default_rng(0).normal(size=rows[::3].shape).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    similarity = queries @ rows.T
    expected = np.argsort(-similarity, axis=1, kind="stable")[:, :3]

    found = store.nearest(queries, 3, store.space_id, "the cloud member")
    assert [[hit["name"] for hit in hits] for hits in found] == [[names[r] for r in row] for row in expected]
    np.testing.assert_allclose([[hit["score"] for hit in hits] for hits in found],
                               np.take_along_axis(similarity, expected, 1), atol=1e-5)


@pytest.mark.parametrize("query_space", [FOREIGN, None], ids=["another-space", "unsaid-space"])
def test_a_query_from_another_space_is_refused_before_any_search(store, monkeypatch, query_space):
    ours = store.space_id
    forbid_search(store, monkeypatch)
    with pytest.raises((G.SpaceMismatch, StoreSpaceMismatch)) as refused:
        store.nearest(np.zeros((1, 32), np.float32), 3, query_space, "a foreign model")
    assert "a foreign model" in str(refused.value) and ours in str(refused.value)
    assert repr(query_space) in str(refused.value)


def test_search_images_refuses_another_space_before_reading_an_image(store, family_copy, tmp_path,
                                                                     monkeypatch):
    foreign = FamilyStore.open(family_copy)
    foreign.manifest.space_id = FOREIGN
    foreign.save()
    forbid_search(store, monkeypatch)
    with pytest.raises((G.SpaceMismatch, StoreSpaceMismatch), match=FOREIGN):  # the images are never listed
        G.search_images(store, tmp_path / "no-such-images", G.open_query_model(foreign, member="edge-a"))
