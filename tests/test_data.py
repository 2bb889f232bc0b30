"""Datasets: open-set splits, readers for folders and zips, unreadable files skipped and counted."""
from __future__ import annotations

import logging
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from hetero.config import DataConfig
from hetero.data import DataError, load_split, procedural_glyphs, read_image_tree, split_open_set
from tests.conftest import OMNIGLOT


def write_folder(root, classes=6, per_class=4, size=20, mode="L", groups=("a", "b")):
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / groups[c % len(groups)] / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, size=(size, size) if mode == "L" else (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels, mode).save(folder / f"{i:02d}.png")
    return root


def test_procedural_glyphs_are_deterministic_and_distinct():
    first, second = procedural_glyphs(6, 3, 32, seed=1), procedural_glyphs(6, 3, 32, seed=1)
    assert torch.equal(first.images, second.images)
    assert first.images.shape == (18, 3, 32, 32) and first.images.dtype == torch.uint8
    other = procedural_glyphs(6, 3, 32, seed=2)
    assert not torch.equal(first.images, other.images)
    # samples of one identity differ from each other (a new hand each time)
    assert not torch.equal(first.images[0], first.images[1])


def test_open_set_split_has_no_class_overlap_and_every_query_has_gallery_items():
    data = procedural_glyphs(20, 6, 24, seed=0)
    split = split_open_set(data, None, 0.3, seed=0)
    train_names, test_names = set(split.train.class_names), set(split.test.class_names)
    assert not train_names & test_names
    assert len(test_names) == 6 and len(train_names) == 14
    assert not set(split.query_index.tolist()) & set(split.gallery_index.tolist())
    gallery_classes = set(split.test.labels[split.gallery_index].tolist())
    assert set(split.test.labels[split.query_index].tolist()) <= gallery_classes
    assert len(split.query_index) + len(split.gallery_index) == len(split.test)


def test_grayscale_folder_groups_and_unreadable_files(tmp_path, caplog):
    root = write_folder(tmp_path / "set")
    corrupt = root / "a" / "class0" / "99.png"
    corrupt.write_bytes(b"not an image at all")
    with caplog.at_level(logging.WARNING, logger="hetero.data"):
        split = load_split(DataConfig(source="imagefolder", path=str(root), test_groups=["b"]), 16)
    assert split.skipped == [f"{root}/a/class0/99.png"]
    assert "99.png" in caplog.text
    assert split.train.images.shape[1:] == (3, 16, 16)  # grayscale read as RGB at the load size
    assert all(name.startswith("a/") for name in split.train.class_names)
    assert all(name.startswith("b/") for name in split.test.class_names)
    assert len(split.train) == 3 * 4  # the corrupt file is not counted


def test_zip_and_extracted_folder_read_the_same(tmp_path):
    root = write_folder(tmp_path / "set", mode="RGB")
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(root.rglob("*.png")):
            handle.write(path, path.relative_to(root).as_posix())
    from_folder, from_zip = read_image_tree(root, 16), read_image_tree(archive, 16)
    assert from_folder.class_names == from_zip.class_names
    assert torch.equal(from_folder.images, from_zip.images)


def test_training_and_galleries_list_alike_and_a_zip_is_read_one_image_at_a_time(tmp_path, monkeypatch):
    """One listing and one reader for training and galleries; a zip's members are read as they are decoded,
    so a zip of many (or large) entries is never held in memory whole."""
    from hetero import data
    from hetero.gallery import list_images as gallery_images

    root = write_folder(tmp_path / "set", mode="RGB")
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(root.rglob("*.png")):
            handle.write(path, path.relative_to(root).as_posix())
    assert [e.name for e in data.list_images(archive)] == [e.name for e in gallery_images(archive)] == \
        [e.name for e in data.list_images(root)]
    events, read, decode = [], zipfile.ZipFile.read, data.decode_image
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda self, name, *a: events.append("read") or read(self, name, *a))
    monkeypatch.setattr(data, "decode_image", lambda *a: events.append("decode") or decode(*a))
    assert len(read_image_tree(archive, 16)) == 24
    assert events == ["read", "decode"] * 24  # never a second payload before the first is decoded


def test_bad_paths_and_groups_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_split(DataConfig(source="imagefolder", path=str(tmp_path / "missing")), 16)
    root = write_folder(tmp_path / "set")
    with pytest.raises(DataError, match="test_groups: zzz not found; available groups: a, b"):
        load_split(DataConfig(source="imagefolder", path=str(root), test_groups=["zzz"]), 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="found no images"):
        load_split(DataConfig(source="imagefolder", path=str(tmp_path / "empty")), 16)


@pytest.mark.skipif(not OMNIGLOT.exists(), reason="../shared/data/omniglot not present")
def test_omniglot_standard_open_set_split():
    split = load_split(DataConfig(source="omniglot", path=str(OMNIGLOT)), 28)
    assert (len(split.train.class_names), len(split.train)) == (136, 2720)
    assert (len(split.test.class_names), len(split.test)) == (106, 2120)
    test_alphabets = {c.split("/")[0] for c in split.test.class_names}
    assert test_alphabets == {"Japanese_(katakana)", "Sanskrit", "Tagalog"}
    # drawers 1-10 are the gallery, 11-20 the queries
    drawers = lambda rows: {int(split.test.names[r].rsplit("_", 1)[1][:2]) for r in rows.tolist()}  # noqa: E731
    assert drawers(split.gallery_index) == set(range(1, 11))
    assert drawers(split.query_index) == set(range(11, 21))


# ------------------------------------------------------------------------- calibration held out of training


def _labeled(counts: list[int]):
    from hetero.data import ImageSet

    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    names = [f"c{int(c)}/{i:03d}.png" for i, c in enumerate(labels)]
    return ImageSet(torch.zeros(len(labels), 1, 4, 4, dtype=torch.uint8), labels,
                    [f"c{c}" for c in range(len(counts))], names)


def test_calibration_holds_out_whole_classes_by_default_and_images_on_request():
    from hetero.data import calibration_split

    train = _labeled([8] * 30)
    keep, held = calibration_split(train, 0.1, "classes", seed=0)
    held_classes, kept_classes = set(train.labels[held].tolist()), set(train.labels[keep].tolist())
    assert len(held_classes) == 3 and not held_classes & kept_classes  # queries of classes never trained on
    assert len(held) == 3 * 8 and len(keep) + len(held) == len(train)
    assert torch.equal(calibration_split(train, 0.1, "classes", seed=0)[1], held)  # the draw is seeded
    assert not torch.equal(calibration_split(train, 0.1, "classes", seed=1)[1], held)
    keep, held = calibration_split(train, 0.1, "images")
    assert len(held) == 30 and set(train.labels[held].tolist()) == set(range(30))  # the last image of each class
    # one class (unlabeled data) or two cannot give unseen classes and keep one to train on: images instead
    keep, held = calibration_split(_labeled([10]), 0.2, "classes")
    assert len(held) == 2 and len(keep) == 8


def test_calibration_by_groups_holds_out_whole_groups_as_a_test_split_by_group_does():
    import dataclasses

    from hetero.data import _group, calibration_split

    train = _labeled([4] * 12)  # alphabets a (2 classes), b (4), c (6)
    names = [f"{group}/char{c}" for c, group in enumerate("aabbbbcccccc")]
    train = dataclasses.replace(train, class_names=names)
    for seed in range(6):
        keep, held = calibration_split(train, 0.1, "groups", seed=seed)
        held_groups = {_group(names[c]) for c in train.labels[held].tolist()}
        kept_groups = {_group(names[c]) for c in train.labels[keep].tolist()}
        assert len(held_groups) >= 1 and kept_groups and not held_groups & kept_groups, seed
        assert len(keep) + len(held) == len(train)
    assert torch.equal(calibration_split(train, 0.5, "groups", seed=3)[1], calibration_split(train, 0.5, "groups",
                                                                                              seed=3)[1])
    keep, held = calibration_split(train, 0.99, "groups", seed=0)  # asking for all of them still trains on one
    assert {_group(names[c]) for c in train.labels[keep].tolist()}
    one_group = dataclasses.replace(train, class_names=[f"a/char{c}" for c in range(12)])
    keep, held = calibration_split(one_group, 0.25, "groups", seed=0)  # nothing to hold out by group: classes
    assert len(set(one_group.labels[held].tolist())) == 3


def test_gallery_and_queries_split_each_class_in_file_order():
    from hetero.data import gallery_and_queries

    train = _labeled([4, 1, 3])
    gallery, queries = gallery_and_queries(train.labels, train.names)
    assert gallery.tolist() == [0, 1, 5, 6] and queries.tolist() == [2, 3, 7]  # class 1 (one image) left out
