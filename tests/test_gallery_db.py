"""Galleries in Milvus: embedded (Milvus Lite) and a server on loopback, the space id enforced by the store."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from hetero import gallery as G  # noqa: E402
from hetero.gallery import db as gallery_db  # noqa: E402
from hetero.cli import main  # noqa: E402
from hetero.gallery.stores import PREFIX, MilvusStore, StoreError, StoreSpaceMismatch  # noqa: E402
from tests.test_gallery import S, gallery_images  # noqa: F401  (fixture)
from tests.test_gallery import set_space_id as with_space  # noqa: E402


def top_names(results: list[dict]) -> list[list[str]]:
    return [[hit["name"] for hit in query["results"]] for query in results]


def test_milvus_gallery_holds_the_faiss_gallery_rows_and_answers_alike(tiny_family_dir, gallery_images,  # noqa: F811
                                                                       tmp_path):
    store = S(tiny_family_dir)
    uri = str(tmp_path / "g.db")
    record = gallery_db.build(store, gallery_images, uri, "g", batch_size=8)
    assert (record["written"], record["rows"], record["already_there"]) == (30, 30, 0)
    G.build_gallery(store, gallery_images, tmp_path / "faiss", shard_size=16, batch_size=8)
    faiss = G.Gallery(tmp_path / "faiss")
    db = MilvusStore(uri, "g")
    stored = db.vectors(faiss.names())
    np.testing.assert_allclose(np.stack([stored[n] for n in faiss.names()]), faiss.embeddings(), atol=1e-6)
    model = G.open_query_model(store, member="edge-a")
    assert top_names(G.search_images(db, gallery_images, model, k=3)) == \
        top_names(G.search_images(faiss, gallery_images, model, k=3))
    identity = db.identity()
    assert (identity.space_id, identity.member, identity.dim, identity.metric) == (store.space_id, "cloud", 32, "IP")


def test_another_space_is_refused_before_any_query_or_image_is_read(tiny_family_dir, family_copy,  # noqa: F811
                                                                      gallery_images, tmp_path):  # noqa: F811
    uri = str(tmp_path / "g.db")
    gallery_db.build(S(tiny_family_dir), gallery_images, uri, "g", batch_size=8)
    foreign = with_space(family_copy, "hs-0123456789abcdef")
    model = G.open_query_model(foreign, member="edge-a")
    with pytest.raises(StoreSpaceMismatch) as refused:
        G.search_images(MilvusStore(uri, "g"), tmp_path / "no-such-images", model)  # images never listed
    assert "hs-0123456789abcdef" in str(refused.value) and S(tiny_family_dir).space_id in str(refused.value)
    # a backward-compatible update keeps the space id: its queries run on the existing collection as they are
    update = with_space(family_copy, S(tiny_family_dir).space_id)
    assert len(G.search_images(MilvusStore(uri, "g"), gallery_images, G.open_query_model(update, member="edge-b"))) \
        == 30


def test_a_resumed_build_duplicates_nothing(tiny_family_dir, gallery_images, tmp_path, monkeypatch):  # noqa: F811
    uri, store = str(tmp_path / "g.db"), S(tiny_family_dir)
    real, calls = MilvusStore.upsert, []

    def crash_on_third(self, ids, vectors):
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of an ingestion
        calls.append(len(ids))
        return real(self, ids, vectors)

    monkeypatch.setattr(MilvusStore, "upsert", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        gallery_db.build(store, gallery_images, uri, "g", batch_size=4)
    monkeypatch.setattr(MilvusStore, "upsert", real)
    assert MilvusStore(uri, "g").count() == 8 and not MilvusStore(uri, "g").properties().get(PREFIX + "writer")
    record = gallery_db.build(store, gallery_images, uri, "g", batch_size=4)
    assert (record["already_there"], record["written"], record["rows"]) == (8, 22, 30)


def test_rows_are_deleted_and_updated_by_name(tiny_family_dir, gallery_images, tmp_path, capsys):  # noqa: F811
    uri, store = str(tmp_path / "g.db"), S(tiny_family_dir)
    gallery_db.build(store, gallery_images, uri, "g", batch_size=8)
    names = sorted(p.relative_to(gallery_images).as_posix() for p in gallery_images.rglob("*.png"))
    assert main(["gallery", "delete", str(tiny_family_dir), "--uri", uri, "--collection", "g", "--ids", names[0],
                 names[1], "not-there.png"]) == 0
    assert "deleted 2 of 3" in " ".join(capsys.readouterr().out.split())
    assert MilvusStore(uri, "g").count() == 28
    record = gallery_db.build(store, gallery_images, uri, "g", batch_size=8, replace=True)  # `gallery update`
    assert (record["written"], record["rows"]) == (30, 30)


def test_a_collection_another_tool_wrote_is_refused_until_adopted(tiny_family_dir, gallery_images,  # noqa: F811
                                                                   tmp_path, capsys):
    from pymilvus import DataType, MilvusClient

    uri, store = str(tmp_path / "theirs.db"), S(tiny_family_dir)
    gallery_db.build(store, gallery_images, str(tmp_path / "ours.db"), "g", batch_size=8)
    ours = MilvusStore(str(tmp_path / "ours.db"), "g")
    names = sorted(p.relative_to(gallery_images).as_posix() for p in gallery_images.rglob("*.png"))
    vectors = ours.vectors(names)
    ours.close()
    client = MilvusClient(uri)  # another tool: its own field names, no hetero properties
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=512)
    schema.add_field("emb", DataType.FLOAT_VECTOR, dim=32)
    index = client.prepare_index_params()
    index.add_index(field_name="emb", index_type="FLAT", metric_type="IP")
    client.create_collection("theirs", schema=schema, index_params=index)
    client.insert("theirs", [{"pk": n, "emb": vectors[n].tolist()} for n in names])
    client.close()

    model = G.open_query_model(store)
    with pytest.raises(StoreSpaceMismatch, match="gallery adopt"):
        G.search_images(MilvusStore(uri, "theirs"), gallery_images, model)
    wrong = S(tiny_family_dir)
    with pytest.raises(StoreError, match=r"stored vectors is min .* needed >= 0.999.*nothing was stamped"):
        gallery_db.adopt(wrong, uri, "theirs", gallery_images, member="edge-a")  # another member's space
    assert MilvusStore(uri, "theirs").identity() is None
    assert main(["gallery", "adopt", str(tiny_family_dir), "--uri", uri, "--collection", "theirs", "--images",
                 str(gallery_images), "--sample", "10"]) == 0
    assert "10 re-embedded images match" in " ".join(capsys.readouterr().out.split())
    assert MilvusStore(uri, "theirs").identity().space_id == store.space_id
    # searched through its own key and vector fields, it answers as the collection hetero wrote does
    assert top_names(G.search_images(MilvusStore(uri, "theirs"), gallery_images, model, k=3)) == \
        top_names(G.search_images(MilvusStore(str(tmp_path / "ours.db"), "g"), gallery_images, model, k=3))


def test_migrate_builds_a_new_collection_then_moves_the_alias(tiny_family_dir, family_copy,
                                                              gallery_images, tmp_path, monkeypatch):  # noqa: F811
    uri = str(tmp_path / "g.db")
    old, new = S(tiny_family_dir), with_space(family_copy, "hs-00000000000000aa")
    first = gallery_db.migrate(old, gallery_images, uri, "gallery", batch_size=8)
    assert MilvusStore(uri, "gallery").collection == first["collection"]
    with pytest.raises(StoreSpaceMismatch):  # the incompatible family is refused by the collection in service
        G.search_images(MilvusStore(uri, "gallery"), gallery_images, G.open_query_model(new))

    real, seen = MilvusStore.upsert, []

    def look(self, ids, vectors):  # while the new collection fills, searches still reach the old one
        seen.append(MilvusStore(uri, "gallery").collection)
        return real(self, ids, vectors)

    monkeypatch.setattr(MilvusStore, "upsert", look)
    second = gallery_db.migrate(new, gallery_images, uri, "gallery", batch_size=8)
    monkeypatch.setattr(MilvusStore, "upsert", real)
    assert set(seen) == {first["collection"]} and second["previous"] == first["collection"]
    assert MilvusStore(uri, "gallery").collection == second["collection"] != first["collection"]
    assert len(G.search_images(MilvusStore(uri, "gallery"), gallery_images, G.open_query_model(new))) == 30
    assert MilvusStore(uri, first["collection"]).count() == 30  # kept, for the queries of the old family


def test_migrate_after_a_plain_build_frees_the_name_for_the_alias(tiny_family_dir, family_copy,  # noqa: F811
                                                                   gallery_images, tmp_path, capsys):  # noqa: F811
    """The guide's order: `gallery build --store milvus` (a collection named gallery), later `gallery migrate`."""
    old, new = S(tiny_family_dir), with_space(family_copy, "hs-00000000000000aa")
    uri = str(tmp_path / "served.db")
    assert main(["gallery", "build", str(tiny_family_dir), "--images", str(gallery_images), "--store", "milvus",
                 "--uri", uri, "--batch-size", "8", "--workers", "0", "--quiet"]) == 0
    assert main(["gallery", "migrate", str(family_copy), "--images", str(gallery_images), "--batch-size", "8",
                 "--workers", "0", "--quiet"]) == 2  # DIR's own database would be an empty, new one
    assert "needs --uri" in " ".join(capsys.readouterr().out.split())
    assert not (family_copy / "gallery.db").exists()
    assert main(["gallery", "migrate", str(family_copy), "--images", str(gallery_images), "--uri", uri,
                 "--batch-size", "8", "--workers", "0", "--quiet"]) == 0
    served = MilvusStore(uri, "gallery")
    assert served.collection == "gallery_hs_00000000000000aa" and served.space_id == new.space_id
    kept = MilvusStore(uri, "gallery_" + old.space_id.replace("-", "_"))
    assert kept.count() == 30 and kept.space_id == old.space_id  # the old gallery, renamed after its space
    assert len(G.search_images(served, gallery_images, G.open_query_model(new))) == 30
    assert main(["gallery", "migrate", str(family_copy), "--images", str(gallery_images), "--uri", uri]) == 2
    assert "nothing to migrate" in " ".join(capsys.readouterr().out.split())


def test_other_dimension_metric_or_builder_is_refused(tiny_family_dir, family_copy, gallery_images,  # noqa: F811
                                                      tmp_path):
    uri = str(tmp_path / "g.db")
    gallery_db.build(S(tiny_family_dir), gallery_images, uri, "g", batch_size=8)
    other = with_space(family_copy, "hs-00000000000000bb")
    with pytest.raises(StoreError, match=r"holds another gallery: space_id .*--overwrite"):
        gallery_db.build(other, gallery_images, uri, "g", batch_size=8)
    db = MilvusStore(uri, "g")
    db.client.alter_collection_properties("g", properties={PREFIX + "writer": json.dumps(
        {"pid": 1, "host": "elsewhere", "renewed": time.time()})})
    with pytest.raises(StoreError, match="being written by another builder .pid 1 on elsewhere"):
        gallery_db.build(S(tiny_family_dir), gallery_images, uri, "g", batch_size=8)
    db.client.alter_collection_properties("g", properties={PREFIX + "writer": json.dumps(
        {"pid": 1, "host": "elsewhere", "renewed": time.time() - 3600})})  # a builder that crashed an hour ago
    assert gallery_db.build(S(tiny_family_dir), gallery_images, uri, "g", batch_size=8)["already_there"] == 30


def test_an_unreachable_server_is_one_clear_error(tmp_path, tiny_family_dir, gallery_images, capsys):  # noqa: F811
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once the socket is closed
    started = time.perf_counter()
    with pytest.raises(StoreError, match=f"http://127.0.0.1:{port}: cannot reach a Milvus server"):
        MilvusStore(f"http://127.0.0.1:{port}", "g", timeout=2)
    assert time.perf_counter() - started < 30


@pytest.mark.slow
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


def test_search_with_a_mistyped_uri_creates_nothing(tiny_family_dir, gallery_images, tmp_path, capsys):  # noqa: F811
    uri = str(tmp_path / "g.db")
    gallery_db.build(S(tiny_family_dir), gallery_images, uri, "g", batch_size=8)
    typo = tmp_path / "gallry.db"
    for argv in (["gallery", "search", str(tiny_family_dir), "--images", str(gallery_images), "--store", "milvus"],
                 ["gallery", "delete", str(tiny_family_dir), "--ids", "a.png"]):
        assert main([*argv, "--uri", str(typo), "--collection", "g"]) == 2
        out = " ".join(capsys.readouterr().out.split())
        assert f"error: --uri {typo}: no Milvus Lite database there" in out and "Traceback" not in out
        assert sorted(p.name for p in tmp_path.iterdir()) == ["g.db"]  # no database, no folder beside it


def test_deleting_names_that_are_not_there_is_a_no_op_that_says_so(tiny_family_dir, gallery_images,  # noqa: F811
                                                                   tmp_path, capsys):
    uri = str(tmp_path / "g.db")
    gallery_db.build(S(tiny_family_dir), gallery_images, uri, "g", batch_size=8)
    names = sorted(p.relative_to(gallery_images).as_posix() for p in gallery_images.rglob("*.png"))[:2]
    argv = ["gallery", "delete", str(tiny_family_dir), "--uri", uri, "--collection", "g", "--ids", *names]
    assert main(argv) == 0
    assert main(argv) == 0  # the same delete again
    out = " ".join(capsys.readouterr().out.split())
    assert "deleted 2 of 2 row(s)" in out and "deleted 0 of 2 row(s)" in out and "; 2 not there" in out, out
    assert MilvusStore(uri, "g").count() == 28


def test_the_claim_of_a_builder_killed_on_this_host_is_stale_at_once(tiny_family_dir, gallery_images,  # noqa: F811
                                                                    tmp_path):
    uri = str(tmp_path / "g.db")
    gallery_db.build(S(tiny_family_dir), gallery_images, uri, "g", batch_size=8)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid now names no process, as after `kill -9` of a builder
    db = MilvusStore(uri, "g")
    db.client.alter_collection_properties("g", properties={PREFIX + "writer": json.dumps(
        {"pid": gone.pid, "host": socket.gethostname(), "renewed": time.time()})})
    db.close()
    assert gallery_db.build(S(tiny_family_dir), gallery_images, uri, "g", batch_size=8)["already_there"] == 30
