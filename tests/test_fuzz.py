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
    from hetero.bundle import BUNDLE_JSON, verify_bundle, write_bundle
    from hetero.family import FamilyStore
    from hetero.reference import ReferenceCache, reference_from_store

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
