"""Galleries: sharded streaming build, resume, FAISS index choice, search with members and artifacts, space ids."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hetero import gallery as G
from hetero.family import FamilyStore
from hetero.gallery import build as gallery_build


def S(path: Path) -> FamilyStore:
    return FamilyStore.open(path)


def set_space_id(family_dir: Path, space_id: str) -> FamilyStore:
    """Pretend the family is another one (or has a retrained cloud member)."""
    store = S(family_dir)
    store.manifest.space_id = space_id
    store.save()
    return store


def export(family_dir: Path, member: str, profile: str):
    from hetero.exporter import export_member
    from hetero.profiles import load_profile

    store = S(family_dir)
    with store.lock("export"):
        return export_member(store, member, load_profile(profile))


@pytest.fixture(scope="module")
def gallery_images(tmp_path_factory) -> Path:
    """30 PNG glyphs (48 px, so every member resizes them) in nested folders and at the top level."""
    from PIL import Image

    from hetero.data import procedural_glyphs

    root = tmp_path_factory.mktemp("gallery-images")
    data = procedural_glyphs(10, 3, 48, seed=7)
    for i, name in enumerate(data.names):
        path = root / (f"{name}.png" if i % 4 else f"top-{i:02d}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.images[i].permute(1, 2, 0).numpy()).save(path)
    return root


def _zip_of(folder: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w") as handle:
        for path in sorted(folder.rglob("*.png")):
            handle.write(path, path.relative_to(folder).as_posix())
    return target


def _in_memory_embeddings(family_dir: Path, folder: Path, batch_size: int) -> tuple[list[str], torch.Tensor]:
    """The reference: every image decoded into one tensor and embedded in one pass (no shards, no loader)."""
    from hetero.data import decode_image
    from hetero.models import embed_images

    store = S(family_dir)
    size = store.config().load_size
    paths = sorted(folder.rglob("*.png"), key=lambda p: p.relative_to(folder).as_posix())
    images = torch.stack([torch.from_numpy(decode_image(p.read_bytes(), size)).permute(2, 0, 1) for p in paths])
    model = store.load_member("cloud")
    return [p.relative_to(folder).as_posix() for p in paths], embed_images(model, images.float() / 255.0, batch_size)


def _files_sha(directory: Path) -> dict[str, str]:
    from hetero.files import sha256_file

    return {p.relative_to(directory).as_posix(): sha256_file(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def test_sharded_build_equals_in_memory_build(tiny_family_dir, gallery_images, tmp_path):
    record = G.build_gallery(S(tiny_family_dir), gallery_images, tmp_path / "g", shard_size=8, batch_size=4)
    names, reference = _in_memory_embeddings(tiny_family_dir, gallery_images, batch_size=4)

    assert record["rows"] == 30 and len(record["shards"]) == 4 and record["index"]["kind"] == "flat"
    gallery = G.Gallery(tmp_path / "g")
    assert gallery.names() == names
    assert torch.equal(torch.from_numpy(gallery.embeddings()), reference)  # bit for bit

    # The index answers exactly like brute force over the in-memory embeddings.
    queries = reference[::3].numpy()
    scores, rows = gallery.search(queries, 5, record["space_id"])
    expected = np.argsort(-(queries @ reference.numpy().T), axis=1, kind="stable")[:, :5]
    assert (rows[:, 0] == np.arange(0, 30, 3)).all()  # each gallery image finds itself first
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ reference.numpy().T, expected, 1), atol=1e-5)


def test_zip_and_folder_give_the_same_gallery(tiny_family_dir, gallery_images, tmp_path):
    archive = _zip_of(gallery_images, tmp_path / "images.zip")
    G.build_gallery(S(tiny_family_dir), gallery_images, tmp_path / "from-folder", shard_size=16, batch_size=8)
    G.build_gallery(S(tiny_family_dir), archive, tmp_path / "from-zip", shard_size=16, batch_size=8, workers=2)
    folder, zipped = G.Gallery(tmp_path / "from-folder"), G.Gallery(tmp_path / "from-zip")
    assert folder.names() == zipped.names()
    assert np.array_equal(folder.embeddings(), zipped.embeddings())


def test_resumed_build_equals_uninterrupted(tiny_family_dir, gallery_images, tmp_path, monkeypatch):
    G.build_gallery(S(tiny_family_dir), gallery_images, tmp_path / "whole", shard_size=8, batch_size=4)

    real_write, written = gallery_build.write_shard, []

    def crash_on_third(out, shard, *args):
        if len(written) == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C while shard 2 was being embedded
        written.append(shard)
        return real_write(out, shard, *args)

    monkeypatch.setattr(gallery_build, "write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        G.build_gallery(S(tiny_family_dir), gallery_images, tmp_path / "resumed", shard_size=8, batch_size=4)
    assert written == [0, 1] and not (tmp_path / "resumed" / G.GALLERY).exists()
    finished = _files_sha(tmp_path / "resumed" / "shards")

    written.clear()
    monkeypatch.setattr(gallery_build, "write_shard",
                        lambda out, shard, *a: written.append(shard) or real_write(out, shard, *a))
    G.build_gallery(S(tiny_family_dir), gallery_images, tmp_path / "resumed", shard_size=8, batch_size=4)
    assert written == [2, 3]  # finished shards were kept, not embedded again
    after = _files_sha(tmp_path / "resumed" / "shards")
    assert {k: after[k] for k in finished} == finished

    whole, resumed = G.Gallery(tmp_path / "whole"), G.Gallery(tmp_path / "resumed")
    assert np.array_equal(whole.embeddings(), resumed.embeddings()) and whole.names() == resumed.names()
    assert after == _files_sha(tmp_path / "whole" / "shards")
    assert whole.record["index"]["sha256"] == resumed.record["index"]["sha256"]


def test_damaged_shard_is_embedded_again(tiny_family_dir, gallery_images, tmp_path):
    out = tmp_path / "g"
    G.build_gallery(S(tiny_family_dir), gallery_images, out, shard_size=8, batch_size=4)
    good = G.Gallery(out).embeddings()
    tensor = out / "shards" / "shard-00001.safetensors"
    tensor.write_bytes(tensor.read_bytes()[:-16])  # a half-written file from a crash
    G.build_gallery(S(tiny_family_dir), gallery_images, out, shard_size=8, batch_size=4)
    assert np.array_equal(G.Gallery(out).embeddings(), good)


def test_other_plan_in_the_same_directory_is_refused(tiny_family_dir, gallery_images, tmp_path):
    out = tmp_path / "g"
    G.build_gallery(S(tiny_family_dir), gallery_images, out, shard_size=8, batch_size=4)
    with pytest.raises(G.GalleryError, match=r"shard_size: 8 -> 16.*--overwrite"):
        G.build_gallery(S(tiny_family_dir), gallery_images, out, shard_size=16, batch_size=4)
    record = G.build_gallery(S(tiny_family_dir), gallery_images, out, shard_size=16, batch_size=4, overwrite=True)
    assert len(record["shards"]) == 2 and sorted(p.name for p in (out / "shards").glob("*.safetensors")) == [
        "shard-00000.safetensors", "shard-00001.safetensors"]
    with pytest.raises(G.GalleryError, match=r"--shard-size 10 must be a positive multiple of --batch-size 4"):
        G.build_gallery(S(tiny_family_dir), gallery_images, tmp_path / "h", shard_size=10, batch_size=4)


def test_unreadable_images_are_skipped_and_named(tiny_family_dir, gallery_images, tmp_path):
    import shutil

    folder = tmp_path / "images"
    shutil.copytree(gallery_images, folder)
    (folder / "broken.png").write_bytes(b"not a png")
    record = G.build_gallery(S(tiny_family_dir), folder, tmp_path / "g", shard_size=8, batch_size=4)
    assert record["rows"] == 30 and record["skipped"] == 1
    shard_records = [json.loads(p.read_text()) for p in sorted((tmp_path / "g" / "shards").glob("*.json"))]
    assert [s for r in shard_records for s in r["skipped"]] == ["broken.png"]
    assert "broken.png" not in G.Gallery(tmp_path / "g").names()


def test_foreign_space_is_refused_with_both_ids(tiny_family_dir, family_copy, gallery_images, tmp_path):
    G.build_gallery(S(tiny_family_dir), gallery_images, tmp_path / "g", shard_size=16, batch_size=8)
    ours = S(tiny_family_dir).space_id
    set_space_id(family_copy, "hs-0123456789abcdef")  # another family (or a retrained cloud member)

    foreign = G.open_query_model(S(family_copy), member="edge-a")
    with pytest.raises(G.SpaceMismatch) as refused:
        G.search_images(tmp_path / "g", gallery_images, foreign)
    assert "hs-0123456789abcdef" in str(refused.value) and ours in str(refused.value)
    with pytest.raises(G.SpaceMismatch, match="hs-0123456789abcdef"):
        G.Gallery(tmp_path / "g").search(np.zeros((1, 32), np.float32), 1, "hs-0123456789abcdef")

    # An exported artifact carries its space id in the file: the artifact of the other family is refused too.
    artifact = export(family_copy, "edge-a", "server-onnx-fp32")
    foreign = G.open_query_model(artifact=family_copy / artifact.file)  # the space id is read from the file
    assert foreign.space_id == "hs-0123456789abcdef"
    with pytest.raises(G.SpaceMismatch) as refused:
        G.search_images(tmp_path / "g", gallery_images, foreign)
    assert "hs-0123456789abcdef" in str(refused.value) and ours in str(refused.value)


def test_edge_member_and_its_onnx_artifact_search_the_cloud_gallery(family_copy, gallery_images, tmp_path):
    G.build_gallery(S(family_copy), gallery_images, tmp_path / "g", shard_size=16, batch_size=8)
    artifact = export(family_copy, "edge-a", "server-onnx-fp32")
    by_torch = G.search_images(tmp_path / "g", gallery_images, G.open_query_model(S(family_copy), member="edge-a"))
    by_onnx = G.search_images(tmp_path / "g", gallery_images,
                              G.open_query_model(S(family_copy), artifact=family_copy / artifact.file))
    assert [q["query"] for q in by_torch] == G.Gallery(tmp_path / "g").names()
    torch_top = [[r["row"] for r in q["results"]] for q in by_torch]
    onnx_top = [[r["row"] for r in q["results"]] for q in by_onnx]
    assert torch_top == onnx_top  # the fp32 artifact ranks the gallery as its torch member does
    scores = np.array([[r["score"] for r in q["results"]] for q in by_onnx])
    np.testing.assert_allclose(scores, [[r["score"] for r in q["results"]] for q in by_torch], atol=1e-4)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_near_duplicates(kind):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, 64))
    gallery = centres[rng.integers(0, 50, 4000)] + 0.6 * rng.normal(size=(4000, 64))
    gallery = (gallery / np.linalg.norm(gallery, axis=1, keepdims=True)).astype(np.float32)
    queries = gallery[:200] + 0.05 * rng.normal(size=(200, 64)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index, params = G.make_index(kind, 64, len(gallery), lambda count: gallery[:count])
    index.add(gallery)
    _, rows = index.search(queries, 1)
    assert (rows[:, 0] == np.arange(200)).mean() >= 0.95
    assert params["nlist"] == 64 if kind == "ivf" else params["M"] == G.HNSW_M


def test_index_choice_by_size():
    assert G.choose_index(G.FLAT_MAX_ROWS) == "flat" and G.choose_index(G.FLAT_MAX_ROWS + 1) == "ivf"
    assert G.ivf_lists(1_000_000) == 1024 and G.ivf_lists(200_000) == 512


def test_cli_build_then_search(tiny_family_dir, gallery_images, tmp_path, family_copy):
    from hetero.cli import main

    out, found = tmp_path / "g", tmp_path / "found.json"
    assert main(["gallery", "build", str(tiny_family_dir), "--images", str(gallery_images), "--out", str(out),
                 "--shard-size", "16", "--batch-size", "8", "--workers", "0", "--quiet"]) == 0
    assert main(["gallery", "search", str(tiny_family_dir), "--images", str(gallery_images), "--gallery", str(out),
                 "-k", "3", "--json", str(found)]) == 0
    queries = json.loads(found.read_text())["queries"]
    assert len(queries) == 30 and all(q["results"][0]["name"] == q["query"] for q in queries)

    set_space_id(family_copy, "hs-ffffffffffffffff")
    assert main(["gallery", "search", str(family_copy), "--images", str(gallery_images), "--gallery", str(out)]) == 2


@pytest.mark.slow
def test_two_process_build_equals_one_process(tiny_family_dir, gallery_images, tmp_path):
    """`torchrun --nproc_per_node 2 -m hetero gallery build` splits the shards and gives the same gallery."""
    G.build_gallery(S(tiny_family_dir), gallery_images, tmp_path / "one", shard_size=8, batch_size=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hetero",
         "gallery", "build", str(tiny_family_dir), "--images", str(gallery_images), "--out", str(tmp_path / "two"),
         "--shard-size", "8", "--batch-size", "4", "--workers", "0", "--quiet"],
        env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    one, two = G.Gallery(tmp_path / "one"), G.Gallery(tmp_path / "two")
    assert np.array_equal(one.embeddings(), two.embeddings()) and one.names() == two.names()
    assert one.record["index"]["sha256"] == two.record["index"]["sha256"]


# ------------------------------------------------------------------------------------------------ import


def test_import_stamps_vectors_only_once_a_sample_proves_their_space(tiny_family_dir, gallery_images, tmp_path):
    """Vectors the user already has (npy + ids, safetensors, parquet) become a searchable gallery of the family's
    space; another member's vectors, wrongly preprocessed ones, or ones of another dimension are refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.numpy import save_file

    names, embeddings = _in_memory_embeddings(tiny_family_dir, gallery_images, 64)
    vectors = embeddings.numpy()
    np.save(tmp_path / "v.npy", vectors)
    (tmp_path / "ids.txt").write_text("\n".join(names) + "\n")
    save_file({"embeddings": vectors}, str(tmp_path / "v.safetensors"), metadata={"ids": json.dumps(names)})
    pq.write_table(pa.table({"id": names, "embedding": [list(map(float, v)) for v in vectors]}), tmp_path / "v.parquet")
    store = S(tiny_family_dir)
    built = G.build_gallery(store, gallery_images, tmp_path / "built", progress=False)
    queries = G.open_query_model(store, "edge-a")
    expected = G.search_images(tmp_path / "built", gallery_images, queries, k=3)
    for source, ids in (("v.npy", tmp_path / "ids.txt"), ("v.safetensors", None), ("v.parquet", None)):
        out = tmp_path / f"imported-{source}"
        record = G.import_gallery(store, tmp_path / source, gallery_images, out, ids=ids, sample=8)
        assert record["space_id"] == built["space_id"] and record["rows"] == len(names)
        assert record["proof"]["checked"] == 8 and record["proof"]["min_cosine"] > 0.9999
        found = G.search_images(out, gallery_images, queries, k=3)
        assert [[h["name"] for h in q["results"]] for q in found] == [[h["name"] for h in q["results"]]
                                                                         for q in expected]

    edge_vectors = _in_memory_embeddings(tiny_family_dir, gallery_images, 64)[1].numpy()[:, ::-1].copy()
    np.save(tmp_path / "other.npy", edge_vectors)
    with pytest.raises(G.GalleryError, match=r"cosine to the stored vectors is min .* needed >= 0.999.*Tried: decode "
                                             r"as RGB.*nothing was stamped"):
        G.import_gallery(store, tmp_path / "other.npy", gallery_images, tmp_path / "refused", ids=tmp_path / "ids.txt")
    assert not (tmp_path / "refused" / G.GALLERY).exists()
    np.save(tmp_path / "narrow.npy", vectors[:, :16])
    with pytest.raises(G.GalleryError, match="16-d vectors; member 'cloud' embeds into 32"):
        G.import_gallery(store, tmp_path / "narrow.npy", gallery_images, tmp_path / "narrow", ids=tmp_path / "ids.txt")
    with pytest.raises(G.GalleryError, match=r"no item ids; give --ids"):
        G.import_gallery(store, tmp_path / "v.npy", gallery_images, tmp_path / "no-ids")
    (tmp_path / "short.txt").write_text("\n".join(names[:-1]))
    with pytest.raises(G.GalleryError, match=f"{len(names)} vectors but {len(names) - 1} ids"):
        G.import_gallery(store, tmp_path / "v.npy", gallery_images, tmp_path / "short", ids=tmp_path / "short.txt")


def test_a_vectors_file_is_read_in_chunks_and_checked_to_its_last_row(tmp_path, monkeypatch):
    """Rows and ids are read a chunk at a time (never the whole file): the rows come back in order, ids from
    --ids line up with the rows of every format, and a fault in a late chunk is found and named by row or id."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hetero.gallery import vectors as V

    monkeypatch.setattr(V, "CHUNK_ROWS", 7)
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((30, 4)).astype(np.float32)
    names = [f"img-{i:02d}.png" for i in range(30)]
    np.save(tmp_path / "v.npy", matrix)
    (tmp_path / "ids.txt").write_text("\ufeff" + "\r\n".join(names) + "\r\n\r\n")
    pq.write_table(pa.table({"id": [f"other-{i}" for i in range(30)], "embedding": matrix.tolist()}),
                   tmp_path / "v.parquet", row_group_size=4)  # batches that never line up with the chunks
    for path in ("v.npy", "v.parquet"):
        source = V.VectorsFile(tmp_path / path, tmp_path / "ids.txt")
        chunks = list(source.chunks())
        assert len(chunks) > 4 and all(len(ids) == len(rows) for ids, rows in chunks)
        assert sum((ids for ids, _ in chunks), []) == names
        np.testing.assert_array_equal(np.concatenate([rows for _, rows in chunks]), matrix)
        listing, found = source.scan({"img-29.png", "absent.png"})
        assert listing == hashlib.sha256("\n".join(names).encode()).hexdigest() and list(found) == ["img-29.png"]
        np.testing.assert_array_equal(found["img-29.png"], matrix[29])

    broken = matrix.copy()
    broken[23, 2] = np.nan
    np.save(tmp_path / "nan.npy", broken)
    with pytest.raises(G.GalleryError, match=r"nan.npy: holds NaN or infinite values \(row 23\)"):
        V.VectorsFile(tmp_path / "nan.npy", tmp_path / "ids.txt").scan()
    (tmp_path / "repeated.txt").write_text("\n".join(names[:27] + ["img-03.png", "img-11.png", "img-29.png"]))
    with pytest.raises(G.GalleryError, match=r"2 id\(s\) repeated \('img-03.png', 'img-11.png'\)"):
        V.VectorsFile(tmp_path / "v.npy", tmp_path / "repeated.txt").scan()
