"""Property-based inputs for every reader a user's files reach: configs, profiles, manifests, bundles, images.

Each property: the input either works or is refused with a HeteroError (the CLI's exit-2 paragraph), never
a traceback, and nothing is written outside the directory being read.
"""
from __future__ import annotations

import copy
import io
import json
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from hetero.cli import main
from hetero.errors import HeteroError
from tests.conftest import tiny_config
from tests.test_verify import exported_family  # noqa: F401  (fixture)

FUZZ = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

HOSTILE = st.sampled_from(["../../../etc/passwd", "/etc/passwd", "..", ".", "", "\x00", "a" * 5000, "C:\\x",
                           "exports/../../x", "checkpoints/../../outside", "~/x", "nan", "-1", "hs-0"])
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=30) | HOSTILE)
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10) | HOSTILE, inner, max_size=4), max_leaves=12)


@st.composite
def mutated(draw, document):
    """`document` with one node (reached by drawn keys and indices) replaced, removed, or given a new key."""
    document = copy.deepcopy(document)
    parent, key = None, None  # the node to change is parent[key], or the document itself
    node = document
    for _ in range(draw(st.integers(1, 5))):
        if isinstance(node, dict) and node:
            parent, key = node, draw(st.sampled_from(sorted(node, key=str)))
        elif isinstance(node, list) and node:
            parent, key = node, draw(st.integers(0, len(node) - 1))
        else:
            break
        node = parent[key]
        if not isinstance(node, (dict, list)) or draw(st.booleans()):
            break
    action = draw(st.sampled_from(["replace", "remove", "add"]))
    if parent is None or (action == "add" and isinstance(node, (dict, list))):
        if isinstance(node, dict):
            node[draw(st.text(max_size=10) | HOSTILE)] = draw(JSON_VALUES)
        elif isinstance(node, list):
            node.append(draw(JSON_VALUES))
    elif action == "remove":
        del parent[key]
    else:
        parent[key] = draw(JSON_VALUES)
    return document


def outside_snapshot(root: Path, inside: Path) -> dict[str, float]:
    """Files below `root` that are not below `inside`, with their modification times."""
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and not p.resolve().is_relative_to(inside.resolve())}


# --------------------------------------------------------------------------------------------- configs


@FUZZ
@given(document=mutated(tiny_config()))
def test_any_config_document_is_read_or_refused_with_a_config_error(document, tmp_path_factory):
    from hetero.config import load_config

    work = tmp_path_factory.mktemp("config")
    path = work / "family.yaml"
    try:
        path.write_text(yaml.safe_dump(document, allow_unicode=True))
    except (yaml.YAMLError, UnicodeEncodeError):
        return  # not representable as YAML text: nothing a user could write
    try:
        load_config(path)
    except HeteroError:
        assert main(["train", str(path), "--out", str(work / "out"), "--quiet"]) == 2
        assert not (work / "out").exists()


@FUZZ
@given(data=st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_any_bytes_as_a_config_or_profile_are_refused_cleanly(data, tmp_path_factory):
    from hetero.config import load_config

    work = tmp_path_factory.mktemp("bytes")
    path = work / "file.yaml"
    path.write_bytes(data)
    try:
        load_config(path)
    except HeteroError:
        pass
    assert main(["profiles", "show", str(path)]) in (0, 2)


@FUZZ
@given(document=st.data())
def test_any_profile_document_is_read_or_refused(document, tmp_path_factory):
    from hetero.profiles import builtin_profile_files

    base = yaml.safe_load(builtin_profile_files()["android-litert-int8"].read_text())
    path = tmp_path_factory.mktemp("profile") / "mine.yaml"
    try:
        path.write_text(yaml.safe_dump(document.draw(mutated(base)), allow_unicode=True))
    except (yaml.YAMLError, UnicodeEncodeError):
        return
    assert main(["profiles", "show", str(path)]) in (0, 2)


# ------------------------------------------------------------------------------------------- manifests


@pytest.mark.slow
@settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(change=st.data())
def test_any_manifest_is_opened_or_refused_and_nothing_outside_is_written(change, exported_family):  # noqa: F811
    from hetero.family import MANIFEST, FamilyStore

    manifest = json.loads((exported_family / MANIFEST).read_text())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        family = root / "family"
        shutil.copytree(exported_family, family)
        (root / "outside.txt").write_text("a file beside the family")
        (family / MANIFEST).write_text(json.dumps(change.draw(mutated(manifest))))
        before = outside_snapshot(root, family)
        try:
            store = FamilyStore.open(family)
            for member in store.members:
                store.load_member(member.name)
            for artifact in store.artifacts():
                store.artifact_path(artifact)
        except HeteroError:
            pass
        assert main(["verify", str(family), "--latency-runs", "1", "--images", "4"]) in (0, 1, 2)
        assert outside_snapshot(root, family) == before


@pytest.mark.slow
@settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(change=st.data())
def test_any_bundle_description_is_verified_or_refused(change, exported_family):  # noqa: F811
    from hetero.verify.bundle import BUNDLE_JSON, verify_bundle, write_bundle
    from hetero.family import FamilyStore
    from hetero.verify.reference import ReferenceCache, reference_from_store

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = FamilyStore.open(exported_family)
        bundle = write_bundle(reference_from_store(store, store.artifacts(), 8, cache=ReferenceCache()),
                              root / "good.zip")
        with zipfile.ZipFile(bundle) as archive:
            meta = json.loads(archive.read(BUNDLE_JSON))
            rewritten = root / "bundle.zip"
            with zipfile.ZipFile(rewritten, "w") as new:
                for info in archive.infolist():
                    data = archive.read(info.filename)
                    if info.filename == BUNDLE_JSON:
                        data = json.dumps(change.draw(mutated(meta))).encode()
                    new.writestr(info.filename, data)
        before = outside_snapshot(root, root / "nothing")
        try:
            verify_bundle(rewritten, latency_runs=1, json_out=root / "report.json")
        except HeteroError:
            pass
        after = outside_snapshot(root, root / "nothing")
        assert set(after) - set(before) <= {str(root / "report.json")}


# ----------------------------------------------------------------------------------------------- images


def _encoded_samples() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8))
    samples = []
    for image, format, options in [
        (rgb, "PNG", {}), (rgb, "JPEG", {"quality": 80}), (rgb.convert("P"), "GIF", {}), (rgb, "BMP", {}),
        (rgb, "TIFF", {}), (rgb, "WEBP", {}), (rgb.convert("RGBA"), "PNG", {}), (rgb.convert("LA"), "PNG", {}),
        (Image.fromarray(rng.integers(0, 65535, (16, 16), dtype=np.uint16)), "PNG", {}),
        (rgb.convert("CMYK"), "JPEG", {}), (rgb.convert("1"), "PNG", {}),
    ]:
        buffer = io.BytesIO()
        image.save(buffer, format, **options)
        samples.append(buffer.getvalue())
    return samples


SAMPLES = _encoded_samples()


@st.composite
def damaged_images(draw):
    data = bytearray(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(0, 6))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(max_examples=300, deadline=None, database=None)
@given(data=damaged_images() | st.binary(max_size=2048), size=st.integers(16, 40),
       background=st.tuples(*[st.integers(0, 255)] * 3))
def test_any_bytes_decode_to_rgb_or_an_image_error(data, size, background):
    from hetero.data import ImageError, decode_image

    try:
        pixels = decode_image(data, size, background)
    except ImageError:
        return
    assert pixels.shape == (size, size, 3) and pixels.dtype == np.uint8


@settings(max_examples=60, deadline=None, database=None)
@given(mode=st.sampled_from(["1", "L", "P", "RGB", "RGBA", "LA", "PA", "I", "I;16", "F", "CMYK", "YCbCr", "HSV"]),
       width=st.integers(1, 40), height=st.integers(1, 40))
def test_every_pillow_mode_decodes_or_is_refused_by_name(mode, width, height):
    from hetero.data import ImageError, decode_image

    image = Image.new(mode, (width, height))
    for format in ("PNG", "TIFF"):
        buffer = io.BytesIO()
        try:
            image.save(buffer, format)
        except (OSError, KeyError, ValueError):
            continue  # Pillow cannot write this mode in this format: no user file looks like this
        try:
            pixels = decode_image(buffer.getvalue(), 16)
        except ImageError as err:
            assert mode == "F" and "mode F" in str(err)
            continue
        assert pixels.shape == (16, 16, 3)


# ------------------------------------------------------------- id lists, vector files, cache shards, output paths


def _npy(shape: tuple, dtype: str, body: bytes) -> bytes:
    """A .npy whose header declares `shape` and `dtype`, followed by `body` (however long it really is)."""
    from numpy.lib import format as npy

    buffer = io.BytesIO()
    npy.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + body


def _damaged(data: bytes, draw) -> bytes:
    data = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@st.composite
def npy_files(draw):
    """Valid, damaged, and lying .npy files: headers that declare shapes their bytes do not hold."""
    rows, dim = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    good = io.BytesIO()
    np.save(good, np.arange(rows * dim, dtype=np.float32).reshape(rows, dim))
    shape = tuple(draw(st.lists(st.integers(0, 2**40), max_size=3)))
    lying = _npy(shape, draw(st.sampled_from(["<f4", "<f8", "|u1", "<i8", "|O", "<U5"])), draw(st.binary(max_size=64)))
    return _damaged(draw(st.sampled_from([good.getvalue(), lying])), draw)


ID_LISTS = st.binary(max_size=200) | st.lists(st.text(max_size=8), max_size=6).map(lambda ids: "\n".join(ids).encode())


@settings(max_examples=150, deadline=None, database=None)
@given(vectors=npy_files(), ids=ID_LISTS)
def test_any_npy_and_id_list_are_read_or_refused(vectors, ids):
    from hetero.gallery import GalleryError, read_vectors

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "v.npy").write_bytes(vectors)
        (Path(tmp) / "ids.txt").write_bytes(ids)
        try:
            names, matrix = read_vectors(Path(tmp) / "v.npy", Path(tmp) / "ids.txt")
        except GalleryError:
            return
        assert len(names) == len(set(names)) == len(matrix) and matrix.dtype == np.float32


ID_VALUES = st.none() | st.integers(-2**63, 2**63 - 1) | st.text(max_size=8)


@settings(max_examples=60, deadline=None, database=None)
@given(ids=st.lists(ID_VALUES, max_size=5), stated=JSON_VALUES, data=st.binary(max_size=300),
       suffix=st.sampled_from([".npy", ".safetensors", ".parquet", ".txt"]))
def test_any_parquet_safetensors_or_bytes_are_read_or_refused(ids, stated, data, suffix):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.numpy import save_file

    from hetero.gallery import GalleryError, read_vectors

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        vectors = [[float(i)] * 3 for i in range(len(ids))]
        try:
            pq.write_table(pa.table({"id": ids, "embedding": vectors}), root / "v.parquet")
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            return  # a column pyarrow cannot hold: no such parquet file exists
        save_file({"embeddings": np.ones((2, 3), np.float32)}, str(root / "v.safetensors"),
                  metadata={"ids": json.dumps(stated)})
        (root / "raw" / f"v{suffix}").parent.mkdir()
        (root / "raw" / f"v{suffix}").write_bytes(data)
        for path in (root / "v.parquet", root / "v.safetensors", root / "raw" / f"v{suffix}"):
            try:
                names, matrix = read_vectors(path)
            except GalleryError:
                continue
            assert len(names) == len(matrix) and all(isinstance(n, str) and n for n in names)


@settings(max_examples=80, deadline=None, database=None)
@given(data=st.data())
def test_any_bundle_arrays_file_is_read_or_refused(data):
    import zipfile

    from hetero.verify.bundle import BundleError, BundleMeta, read_arrays

    members = {"query_images": np.zeros((2, 3, 4, 4), np.uint8), "query_labels": np.zeros(2, np.int64),
               "gallery": np.zeros((3, 4), np.float32), "gallery_labels": np.zeros(3, np.int64)}
    name = data.draw(st.sampled_from(sorted(members)))
    meta = BundleMeta(bundle_version=1, family="f", space_id="s", gallery_space_id="s", cloud="c", source="x",
                      members={}, artifacts=[], profiles={}, torch_figures={})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        with zipfile.ZipFile(folder / "arrays.npz", "w") as archive:
            for key, value in members.items():
                buffer = io.BytesIO()
                np.save(buffer, value)
                archive.writestr(f"{key}.npy", data.draw(npy_files()) if key == name else buffer.getvalue())
        try:
            read_arrays(folder, folder / "bundle.zip", meta)
        except BundleError:
            pass


@settings(max_examples=80, deadline=None, database=None)
@given(data=st.data())
def test_any_teacher_cache_shard_is_opened_or_refused(data):
    import torch

    from hetero.errors import ManifestError
    from hetero.family import save_weights
    from hetero.training.teacher_cache import PARAMS, TeacherCache

    plan = {"images": 3, "views": 2}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cache"
        cache = TeacherCache.open_or_create(root, plan)
        shapes = {"params": (3, 2, PARAMS), "view": (3, 2, 4), "matching": (3, 2, 4)}
        if data.draw(st.booleans()):  # other shapes or names
            key = data.draw(st.sampled_from(sorted(shapes)))
            shapes[data.draw(st.sampled_from([key, "other"]))] = tuple(data.draw(st.lists(st.integers(0, 4),
                                                                                             max_size=3)))
        save_weights(cache.shard_path(0), {k: torch.zeros(s) for k, s in shapes.items()}, {"plan": plan})
        shard = cache.shard_path(0)
        shard.write_bytes(_damaged(shard.read_bytes(), data.draw))
        try:
            opened = TeacherCache.open_or_create(root, plan)
        except ManifestError:
            return
        for image in range(3):
            params, view, matching = opened.row(image, 1)
            assert params.shape == (PARAMS,) and view.shape == matching.shape


PATH_PARTS = st.sampled_from(["a-file", "a-folder", "new", "x.json", ".", ".."])


@settings(max_examples=150, deadline=None, database=None)
@given(parts=st.lists(PATH_PARTS, min_size=0, max_size=4), folder=st.booleans())
def test_any_output_path_is_writable_once_accepted(parts, folder):
    from hetero.errors import ConfigError
    from hetero.files import atomic_write_text, check_output

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "work"
        (root / "a-folder").mkdir(parents=True)
        (root / "a-file").write_text("the user's own file")
        path = root.joinpath(*parts)
        try:
            check_output(path, "--out", folder=folder)
        except ConfigError as err:
            assert str(err).startswith(f"--out {path}: ")
            return
        finally:
            assert (root / "a-file").read_text() == "the user's own file"
        if folder:
            path.mkdir(parents=True, exist_ok=True)
        else:
            atomic_write_text(path, "written")
            assert path.read_text() == "written"


# ------------------------------------------------------------------------------- lock files, model files

LOCK_SHAPES = st.sampled_from(["absent", "bytes", "folder", "dangling-link", "link-loop"])


def _place(path: Path, shape: str, payload: bytes) -> None:
    if shape == "bytes":
        path.write_bytes(payload)
    elif shape == "folder":
        path.mkdir()
        (path / "inside").write_bytes(payload)
    elif shape == "dangling-link":
        path.symlink_to(path.parent / "nowhere")
    elif shape == "link-loop":
        path.symlink_to(path)


@settings(max_examples=120, deadline=None, database=None)
@given(lock=LOCK_SHAPES, holder=LOCK_SHAPES, payload=st.binary(max_size=64) | st.sampled_from(
    [b'{"pid": 1, "host": "elsewhere", "verb": "train"}', b"[]", b'{"pid": null}', b"\xff\xfe"]))
def test_any_lock_file_and_holder_record_is_taken_over_or_refused_by_name(lock, holder, payload):
    """A family's lock and its holder record, whatever a crash or a user left there: the lock is taken (and
    released, leaving no record) or refused with a LockError that names the file."""
    from hetero.errors import LockError
    from hetero.files import LOCK_FILE, LOCK_HOLDER, DirectoryLock

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "family"
        root.mkdir()
        _place(root / LOCK_FILE, lock, payload)
        _place(root / LOCK_HOLDER, holder, payload)
        try:
            with DirectoryLock(root, "export"):
                pass
        except LockError as err:
            assert LOCK_FILE in str(err) or LOCK_HOLDER in str(err)
            return
        assert not (root / LOCK_HOLDER).is_file() or holder == "folder"


@pytest.fixture(scope="module")
def small_onnx_model(tmp_path_factory) -> bytes:
    import torch

    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return torch.nn.functional.normalize(self.conv(x).mean(dim=(2, 3)), dim=1)

    path = tmp_path_factory.mktemp("onnx") / "cloud.onnx"
    torch.onnx.export(Embed().eval(), (torch.rand(1, 3, 16, 16),), str(path), input_names=["images"],
                      output_names=["embedding"], dynamic_axes={"images": {0: "batch"}}, dynamo=False)
    return path.read_bytes()


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_onnx_cloud_file_is_opened_or_refused_with_a_config_error(small_onnx_model, data):
    """An external cloud's model file, damaged anywhere (header, graph, weights) or cut short: opened and
    embedding, or refused naming the file; never a protobuf or runtime traceback."""
    import torch

    from hetero.errors import ConfigError
    from hetero.external import ExternalCloud, Preprocessing

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cloud.onnx"
        path.write_bytes(_damaged(small_onnx_model, data.draw))
        try:
            cloud = ExternalCloud(path, "onnx", Preprocessing(16, (0.0,) * 3, (1.0,) * 3))
            out = cloud(torch.rand(2, 3, 16, 16))
        except ConfigError as err:
            assert "cloud.onnx" in str(err)
            return
        assert out.shape[0] == 2
