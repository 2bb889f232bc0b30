"""Galleries in a vector database, every backend through the same tests: Milvus (embedded Milvus Lite, and a
server on loopback) and LanceDB (an embedded database folder); the space id enforced by the store."""
from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hetero import gallery as G
from hetero.cli import main
from hetero.gallery import db as gallery_db
from hetero.gallery.db import open_store
from hetero.gallery.stores import WRITER, MilvusStore, StoreError, StoreSpaceMismatch
from tests.test_gallery import S, gallery_images  # noqa: F401  (fixture)
from tests.test_gallery import set_space_id as with_space

MILVUS = all(importlib.util.find_spec(name) is not None for name in ("pymilvus", "milvus_lite"))
LANCE = importlib.util.find_spec("lancedb") is not None
needs_milvus = pytest.mark.skipif(not MILVUS, reason="Milvus needs pymilvus and milvus-lite (hetero[milvus])")


@pytest.fixture(params=[pytest.param("milvus", marks=needs_milvus),
                        pytest.param("lance", marks=pytest.mark.skipif(not LANCE, reason="LanceDB needs lancedb"))])
def backend(request) -> str:
    return request.param


def store_class(backend: str):
    from hetero.gallery.lance import LanceStore

    return MilvusStore if backend == "milvus" else LanceStore


def write_as_another_tool(backend: str, uri: str, name: str, rows: dict) -> None:
    """A collection (table) another tool wrote: its own key and vector field names, no hetero properties."""
    if backend == "milvus":
        from pymilvus import DataType, MilvusClient

        client = MilvusClient(uri)
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=512)
        schema.add_field("emb", DataType.FLOAT_VECTOR, dim=32)
        index = client.prepare_index_params()
        index.add_index(field_name="emb", index_type="FLAT", metric_type="IP")
        client.create_collection(name, schema=schema, index_params=index)
        client.insert(name, [{"pk": key, "emb": vector.tolist()} for key, vector in rows.items()])
        client.close()
        return
    import lancedb
    import pyarrow as pa

    table = pa.table({"pk": list(rows), "emb": pa.FixedSizeListArray.from_arrays(
        pa.array(np.concatenate(list(rows.values())).astype(np.float32)), 32)})
    lancedb.connect(uri).create_table(name, data=table)


def write_claim(db, claim: dict) -> None:
    """Record a builder's claim as another process would (a running builder, or one that crashed)."""
    if isinstance(db, MilvusStore):
        db.client.alter_collection_properties(db.collection, properties={WRITER: json.dumps(claim)})
    else:
        db.table().update_field_metadata({"path": "vector", "metadata": {WRITER: json.dumps(claim)}})


def top_names(results: list[dict]) -> list[list[str]]:
    return [[hit["name"] for hit in query["results"]] for query in results]


def test_a_database_gallery_holds_the_faiss_gallery_rows_and_answers_alike(backend, tiny_family_dir,
                                                                           gallery_images, tmp_path):  # noqa: F811
    store = S(tiny_family_dir)
    uri = str(tmp_path / "g.db")
    record = gallery_db.build(store, gallery_images, uri, "g", batch_size=8, backend=backend)
    assert (record["written"], record["rows"], record["already_there"]) == (30, 30, 0)
    G.build_gallery(store, gallery_images, tmp_path / "faiss", shard_size=16, batch_size=8)
    faiss = G.Gallery(tmp_path / "faiss")
    db = open_store(uri, "g", backend)
    stored = db.vectors(faiss.names())
    np.testing.assert_allclose(np.stack([stored[n] for n in faiss.names()]), faiss.embeddings(), atol=1e-6)
    model = G.open_query_model(store, member="edge-a")
    assert top_names(G.search_images(db, gallery_images, model, k=3)) == \
        top_names(G.search_images(faiss, gallery_images, model, k=3))
    identity = db.identity()
    assert (identity.space_id, identity.member, identity.dim, identity.metric) == (store.space_id, "cloud", 32, "IP")


def test_another_space_is_refused_before_any_query_or_image_is_read(backend, tiny_family_dir,
                                                                      family_copy,
                                                                      gallery_images, tmp_path):  # noqa: F811
    uri = str(tmp_path / "g.db")
    gallery_db.build(S(tiny_family_dir), gallery_images, uri, "g", batch_size=8, backend=backend)
    foreign = with_space(family_copy, "hs-0123456789abcdef")
    model = G.open_query_model(foreign, member="edge-a")
    with pytest.raises(StoreSpaceMismatch) as refused:
        G.search_images(open_store(uri, "g", backend), tmp_path / "no-such-images", model)  # images never listed
    assert "hs-0123456789abcdef" in str(refused.value) and S(tiny_family_dir).space_id in str(refused.value)
    # a backward-compatible update keeps the space id: its queries run on the existing collection as they are
    update = with_space(family_copy, S(tiny_family_dir).space_id)
    assert len(G.search_images(open_store(uri, "g", backend), gallery_images,
                               G.open_query_model(update, member="edge-b"))) \
        == 30


def test_a_resumed_build_duplicates_nothing(backend, tiny_family_dir, gallery_images, tmp_path,  # noqa: F811
                                            monkeypatch):
    uri, store = str(tmp_path / "g.db"), S(tiny_family_dir)
    monkeypatch.setattr(gallery_db, "UPSERT_ROWS", 4)  # blocks of 4 images, each written in one upsert
    real, calls = store_class(backend).upsert, []

    def crash_on_third(self, ids, vectors):
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of an ingestion
        calls.append(len(ids))
        return real(self, ids, vectors)

    monkeypatch.setattr(store_class(backend), "upsert", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        gallery_db.build(store, gallery_images, uri, "g", batch_size=4, backend=backend)
    monkeypatch.setattr(store_class(backend), "upsert", real)
    assert open_store(uri, "g", backend).count() == 8 and not open_store(uri, "g", backend).properties().get(WRITER)
    record = gallery_db.build(store, gallery_images, uri, "g", batch_size=4, backend=backend)
    assert (record["already_there"], record["written"], record["rows"]) == (8, 22, 30)


def test_rows_are_deleted_and_updated_by_name(backend, tiny_family_dir, gallery_images, tmp_path,  # noqa: F811
                                              capsys):
    uri, store = str(tmp_path / "g.db"), S(tiny_family_dir)
    gallery_db.build(store, gallery_images, uri, "g", batch_size=8, backend=backend)
    names = sorted(p.relative_to(gallery_images).as_posix() for p in gallery_images.rglob("*.png"))
    assert main(["gallery", "delete", str(tiny_family_dir), "--store", backend, "--uri", uri, "--collection", "g",
                 "--ids", names[0],
                 names[1], "not-there.png"]) == 0
    assert "deleted 2 of 3" in " ".join(capsys.readouterr().out.split())
    assert open_store(uri, "g", backend).count() == 28
    record = gallery_db.build(store, gallery_images, uri, "g", batch_size=8, backend=backend,
                              replace=True)  # `gallery update`
    assert (record["written"], record["rows"]) == (30, 30)


def test_a_collection_another_tool_wrote_is_refused_until_adopted(backend, tiny_family_dir,
                                                                   gallery_images,  # noqa: F811
                                                                   tmp_path, capsys):
    uri, store = str(tmp_path / "theirs.db"), S(tiny_family_dir)
    gallery_db.build(store, gallery_images, str(tmp_path / "ours.db"), "g", batch_size=8, backend=backend)
    ours = open_store(str(tmp_path / "ours.db"), "g", backend)
    names = sorted(p.relative_to(gallery_images).as_posix() for p in gallery_images.rglob("*.png"))
    vectors = ours.vectors(names)
    ours.close()
    write_as_another_tool(backend, uri, "theirs", {n: vectors[n] for n in names})  # its own field names

    model = G.open_query_model(store)
    with pytest.raises(StoreSpaceMismatch, match="gallery adopt"):
        G.search_images(open_store(uri, "theirs", backend), gallery_images, model)
    wrong = S(tiny_family_dir)
    with pytest.raises(StoreError, match=r"stored vectors is min .* needed >= 0.999.*nothing was stamped"):
        gallery_db.adopt(wrong, uri, "theirs", gallery_images, member="edge-a", backend=backend)  # another space
    assert open_store(uri, "theirs", backend).identity() is None
    assert main(["gallery", "adopt", str(tiny_family_dir), "--store", backend, "--uri", uri, "--collection", "theirs",
                 "--images",
                 str(gallery_images), "--sample", "10"]) == 0
    assert "10 re-embedded images match" in " ".join(capsys.readouterr().out.split())
    assert open_store(uri, "theirs", backend).identity().space_id == store.space_id
    # searched through its own key and vector fields, it answers as the collection hetero wrote does
    assert top_names(G.search_images(open_store(uri, "theirs", backend), gallery_images, model, k=3)) == \
        top_names(G.search_images(open_store(str(tmp_path / "ours.db"), "g", backend), gallery_images, model, k=3))


def test_migrate_builds_a_new_collection_then_moves_the_alias(backend, tiny_family_dir, family_copy,
                                                              gallery_images, tmp_path, monkeypatch):  # noqa: F811
    uri = str(tmp_path / "g.db")
    old, new = S(tiny_family_dir), with_space(family_copy, "hs-00000000000000aa")
    first = gallery_db.migrate(old, gallery_images, uri, "gallery", batch_size=8, backend=backend)
    assert open_store(uri, "gallery", backend).collection == first["collection"]
    with pytest.raises(StoreSpaceMismatch):  # the incompatible family is refused by the collection in service
        G.search_images(open_store(uri, "gallery", backend), gallery_images, G.open_query_model(new))

    real, seen = store_class(backend).upsert, []

    def look(self, ids, vectors):  # while the new collection fills, searches still reach the old one
        seen.append(open_store(uri, "gallery", backend).collection)
        return real(self, ids, vectors)

    monkeypatch.setattr(store_class(backend), "upsert", look)
    second = gallery_db.migrate(new, gallery_images, uri, "gallery", batch_size=8, backend=backend)
    monkeypatch.setattr(store_class(backend), "upsert", real)
    assert set(seen) == {first["collection"]} and second["previous"] == first["collection"]
    assert open_store(uri, "gallery", backend).collection == second["collection"] != first["collection"]
    assert len(G.search_images(open_store(uri, "gallery", backend), gallery_images, G.open_query_model(new))) == 30
    assert open_store(uri, first["collection"], backend).count() == 30  # kept, for the queries of the old family


def test_migrate_after_a_plain_build_frees_the_name_for_the_alias(backend, tiny_family_dir, family_copy,
                                                                   gallery_images, tmp_path, capsys):  # noqa: F811
    """The guide's order: `gallery build --store milvus` (a collection named gallery), later `gallery migrate`."""
    old, new = S(tiny_family_dir), with_space(family_copy, "hs-00000000000000aa")
    uri = str(tmp_path / "served.db")
    assert main(["gallery", "build", str(tiny_family_dir), "--images", str(gallery_images), "--store", backend,
                 "--uri", uri, "--batch-size", "8", "--workers", "0", "--quiet"]) == 0
    assert main(["gallery", "migrate", str(family_copy), "--store", backend, "--images", str(gallery_images),
                 "--batch-size", "8",
                 "--workers", "0", "--quiet"]) == 2  # DIR's own database would be an empty, new one
    assert "needs --uri" in " ".join(capsys.readouterr().out.split())
    assert not (family_copy / "gallery.db").exists()
    assert main(["gallery", "migrate", str(family_copy), "--store", backend, "--images", str(gallery_images),
                 "--uri", uri,
                 "--batch-size", "8", "--workers", "0", "--quiet"]) == 0
    served = open_store(uri, "gallery", backend)
    assert served.collection == "gallery_hs_00000000000000aa" and served.space_id == new.space_id
    kept = open_store(uri, "gallery_" + old.space_id.replace("-", "_"), backend)
    assert kept.count() == 30 and kept.space_id == old.space_id  # the old gallery, renamed after its space
    assert len(G.search_images(served, gallery_images, G.open_query_model(new))) == 30
    assert main(["gallery", "migrate", str(family_copy), "--store", backend, "--images", str(gallery_images),
                 "--uri", uri]) == 2
    assert "nothing to migrate" in " ".join(capsys.readouterr().out.split())


def test_other_dimension_metric_or_builder_is_refused(backend, tiny_family_dir, family_copy,
                                                      gallery_images,  # noqa: F811
                                                      tmp_path):
    uri = str(tmp_path / "g.db")
    gallery_db.build(S(tiny_family_dir), gallery_images, uri, "g", batch_size=8, backend=backend)
    other = with_space(family_copy, "hs-00000000000000bb")
    with pytest.raises(StoreError, match=r"holds another gallery: space_id .*--overwrite"):
        gallery_db.build(other, gallery_images, uri, "g", batch_size=8, backend=backend)
    db = open_store(uri, "g", backend)
    write_claim(db, {"pid": 1, "host": "elsewhere", "renewed": time.time()})
    with pytest.raises(StoreError, match="being written by another builder .pid 1 on elsewhere"):
        gallery_db.build(S(tiny_family_dir), gallery_images, uri, "g", batch_size=8, backend=backend)
    write_claim(db, {"pid": 1, "host": "elsewhere", "renewed": time.time() - 3600})  # crashed an hour ago
    assert gallery_db.build(S(tiny_family_dir), gallery_images, uri, "g", batch_size=8,
                            backend=backend)["already_there"] == 30


@needs_milvus
def test_an_unreachable_server_is_one_clear_error(tmp_path, tiny_family_dir, gallery_images, capsys):  # noqa: F811
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once the socket is closed
    started = time.perf_counter()
    with pytest.raises(StoreError, match=f"http://127.0.0.1:{port}: cannot reach a Milvus server"):
        MilvusStore(f"http://127.0.0.1:{port}", "g", timeout=2)
    assert time.perf_counter() - started < 30


@pytest.mark.slow
@needs_milvus
def test_a_milvus_server_on_loopback_takes_the_same_calls(tiny_family_dir, gallery_images, tmp_path):  # noqa: F811
    """The cluster path: a server process and a network URI, the same client code as the embedded mode."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(tmp_path / "data"),
                               "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        uri = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                MilvusStore(uri, "g", timeout=2).close()
                break
            except StoreError:
                assert time.time() < deadline and server.poll() is None, "the server did not come up"
                time.sleep(0.5)
        store = S(tiny_family_dir)
        assert main(["gallery", "build", str(tiny_family_dir), "--images", str(gallery_images), "--store", "milvus",
                     "--uri", uri, "--collection", "g", "--batch-size", "8", "--workers", "0", "--quiet"]) == 0
        results = G.search_images(MilvusStore(uri, "g"), gallery_images, G.open_query_model(store), k=1)
        assert all(q["results"][0]["name"] == q["query"] for q in results)  # each image finds itself
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_search_with_a_mistyped_uri_creates_nothing(backend, tiny_family_dir, gallery_images, tmp_path,  # noqa: F811
                                                    capsys):
    uri = str(tmp_path / "g.db")
    gallery_db.build(S(tiny_family_dir), gallery_images, uri, "g", batch_size=8, backend=backend)
    typo = tmp_path / "gallry.db"
    for argv in (["gallery", "search", str(tiny_family_dir), "--images", str(gallery_images), "--store", backend],
                 ["gallery", "delete", str(tiny_family_dir), "--store", backend, "--ids", "a.png"]):
        assert main([*argv, "--uri", str(typo), "--collection", "g"]) == 2
        out = " ".join(capsys.readouterr().out.split())
        database = "Milvus Lite" if backend == "milvus" else "LanceDB"
        assert f"error: --uri {typo}: no {database} database there" in out and "Traceback" not in out
        assert sorted(p.name for p in tmp_path.iterdir()) == ["g.db"]  # no database, no folder beside it


def test_deleting_names_that_are_not_there_is_a_no_op_that_says_so(backend, tiny_family_dir,
                                                                   gallery_images,  # noqa: F811
                                                                   tmp_path, capsys):
    uri = str(tmp_path / "g.db")
    gallery_db.build(S(tiny_family_dir), gallery_images, uri, "g", batch_size=8, backend=backend)
    names = sorted(p.relative_to(gallery_images).as_posix() for p in gallery_images.rglob("*.png"))[:2]
    argv = ["gallery", "delete", str(tiny_family_dir), "--store", backend, "--uri", uri, "--collection", "g",
            "--ids", *names]
    assert main(argv) == 0
    assert main(argv) == 0  # the same delete again
    out = " ".join(capsys.readouterr().out.split())
    assert "deleted 2 of 2 row(s)" in out and "deleted 0 of 2 row(s)" in out and "; 2 not there" in out, out
    assert open_store(uri, "g", backend).count() == 28


def test_the_claim_of_a_builder_killed_on_this_host_is_stale_at_once(backend, tiny_family_dir,
                                                                    gallery_images,  # noqa: F811
                                                                    tmp_path):
    uri = str(tmp_path / "g.db")
    gallery_db.build(S(tiny_family_dir), gallery_images, uri, "g", batch_size=8, backend=backend)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid now names no process, as after `kill -9` of a builder
    db = open_store(uri, "g", backend)
    write_claim(db, {"pid": gone.pid, "host": socket.gethostname(), "renewed": time.time()})
    db.close()
    assert gallery_db.build(S(tiny_family_dir), gallery_images, uri, "g", batch_size=8,
                            backend=backend)["already_there"] == 30


def test_vectors_are_imported_into_a_collection_in_chunks_and_a_rerun_after_a_crash_duplicates_nothing(
        backend, tiny_family_dir, gallery_images, tmp_path, monkeypatch, capsys):  # noqa: F811
    """`gallery import --store`: the sample's proof first (a foreign file creates nothing), then upserts a chunk
    at a time; killed after one chunk, the same command again leaves every row once, answering as FAISS does."""
    from tests.test_gallery import _in_memory_embeddings

    store = S(tiny_family_dir)
    names, embeddings = _in_memory_embeddings(tiny_family_dir, gallery_images, 8)
    np.save(tmp_path / "v.npy", embeddings.numpy())
    np.save(tmp_path / "foreign.npy", embeddings.numpy()[:, ::-1].copy())
    (tmp_path / "ids.txt").write_text("\n".join(names) + "\n")
    uri = str(tmp_path / "g.db")

    def import_(vectors: str) -> int:
        return main(["gallery", "import", str(tiny_family_dir), "--vectors", str(tmp_path / vectors), "--ids",
                     str(tmp_path / "ids.txt"), "--images", str(gallery_images), "--sample", "8", "--store", backend,
                     "--uri", uri, "--collection", "g"])

    assert import_("foreign.npy") == 2
    assert "not in the space of" in " ".join(capsys.readouterr().out.split()) and not (tmp_path / "g.db").exists()
    monkeypatch.setattr(gallery_db, "UPSERT_ROWS", 12)
    real, calls = store_class(backend).upsert, []

    def crash_on_second(self, ids, vectors):
        if calls:
            raise KeyboardInterrupt  # killed after one chunk was written
        calls.append(len(ids))
        return real(self, ids, vectors)

    monkeypatch.setattr(store_class(backend), "upsert", crash_on_second)
    assert import_("v.npy") == 130  # the CLI's exit on Ctrl-C
    monkeypatch.setattr(store_class(backend), "upsert", real)
    assert open_store(uri, "g", backend).count() == 12
    assert import_("v.npy") == 0
    assert "imported 30 vectors" in " ".join(capsys.readouterr().out.split())
    db = open_store(uri, "g", backend)
    assert db.count() == 30 and db.identity().space_id == store.space_id
    G.build_gallery(store, gallery_images, tmp_path / "faiss", batch_size=8)
    model = G.open_query_model(store, member="edge-a")
    assert top_names(G.search_images(db, gallery_images, model, k=3)) == \
        top_names(G.search_images(G.Gallery(tmp_path / "faiss"), gallery_images, model, k=3))


@pytest.mark.skipif(not LANCE, reason="LanceDB needs lancedb")
def test_lance_appends_new_ids_merges_known_ones_and_sees_another_writers_rows(tmp_path, monkeypatch):
    from lancedb.table import LanceTable

    from hetero.gallery.lance import KeyDigest, LanceStore
    from hetero.gallery.stores import Identity

    def unit(n: int, seed: int) -> np.ndarray:
        rows = np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    def table_rows(store) -> dict[str, np.ndarray]:
        rows = store.table().to_arrow()
        return dict(zip(rows["id"].to_pylist(), np.asarray(rows["vector"].to_pylist(), np.float32)))

    merges, real_merge = [], LanceTable.merge_insert
    monkeypatch.setattr(LanceTable, "merge_insert", lambda self, key: merges.append(key) or real_merge(self, key))
    first = LanceStore(str(tmp_path / "db"), "t", create=True)
    first.create(Identity("hs-digest", "f", "cloud", 4))
    first.upsert([f"a{i}" for i in range(10)], unit(10, 0))
    assert merges == []  # a fresh table is appended to: a merge would join every write with every key

    other = LanceStore(str(tmp_path / "db"), "t")  # another writer moves the table on
    other.upsert(["a0", "b0"], unit(2, 1))
    update = unit(3, 2)
    first.upsert(["a0", "b0", "c0"], update)  # first's digest must see b0, or b0 would be appended twice
    assert merges == ["id", "id"]  # one merge per write, of the ids the table may hold
    rows = table_rows(first)
    assert len(first.table().to_arrow()) == len(rows) == 12
    for name, vector in zip(["a0", "b0", "c0"], update):
        np.testing.assert_allclose(rows[name], vector, atol=1e-6)
    assert first.present(["a3", "b0", "c0", "zz"]) == {"a3", "b0", "c0"}

    reads = []
    monkeypatch.setattr(LanceStore, "digest", lambda self, real=LanceStore.digest: reads.append(
        self._digest is None or self._digest.version != self.table().version) or real(self))
    first.claim()  # a builder renews its claim per block: a metadata commit must not make it reread every id
    first.upsert(["e0"], unit(1, 4))
    first.release()
    assert reads == [False]  # the digest was still the table's: nothing reread

    monkeypatch.setattr(KeyDigest, "of", staticmethod(lambda ids: np.zeros(len(ids), np.int64)))
    colliding = LanceStore(str(tmp_path / "db"), "t")  # every id's hash is every other's: all go the exact way
    colliding.upsert(["a1", "d0"], unit(2, 3))
    assert len(colliding.table().to_arrow()) == len(table_rows(colliding)) == 14
    assert colliding.present(["a1", "d0", "zz"]) == {"a1", "d0"}


@pytest.mark.skipif(not LANCE, reason="LanceDB needs lancedb")
def test_a_lance_table_past_the_exact_search_size_is_indexed_and_still_finds_every_row(tmp_path, monkeypatch):
    from hetero.gallery import lance
    from hetero.gallery.stores import Identity

    monkeypatch.setattr(lance, "FLAT_MAX_ROWS", 100)
    rows = np.random.default_rng(0).standard_normal((400, 8)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    ids = [f"img-{i:03d}" for i in range(len(rows))]
    store = lance.LanceStore(str(tmp_path / "db"), "t", create=True)
    store.create(Identity("hs-index", "f", "cloud", 8))
    store.upsert(ids, rows)
    store.flush()
    indices = store.table().list_indices()
    assert [(index.index_type, index.columns) for index in indices] == [("IvfFlat", ["vector"])]
    found = store.search(rows[:50], k=1)  # 32 lists probed of the 16 that 400 rows get: every list is seen
    assert [hits[0][0] for hits in found] == ids[:50]


@given(st.lists(st.lists(st.text(max_size=12), max_size=6), min_size=1, max_size=40), st.sets(st.text(max_size=12)))
@settings(max_examples=60, deadline=None)
def test_a_key_digest_never_forgets_an_id_it_was_given(writes, others):
    from hetero.gallery.lance import KeyDigest

    digest = KeyDigest(KeyDigest.of(writes[0]), version=0)  # the table as read, then this process's writes
    for ids in writes[1:]:  # up to 39 writes: past DIGEST_RUNS the runs are merged on the way
        digest.add(ids)
    given = [i for ids in writes for i in ids]
    assert digest.may_hold(given).all()
    unseen = sorted(others - set(given))
    assert not digest.may_hold(unseen).any()  # 64-bit hashes: a collision among a few ids does not happen
