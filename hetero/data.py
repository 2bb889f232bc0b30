"""Datasets: image folders (plain or zipped, Omniglot included) and a built-in procedural one.

Images are decoded once into a uint8 tensor at the family's load size; every member then receives the
same (augmented) batch and resizes it to its own input size.  Splits are by class (open-set): the
evaluation classes never appear in training.
"""
from __future__ import annotations

import io
import logging
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2
from tqdm import tqdm

log = logging.getLogger("hetero.data")

OMNIGLOT_TEST_ALPHABETS = ["Japanese_(katakana)", "Sanskrit", "Tagalog"]


class DataError(RuntimeError):
    """A dataset that cannot be used as configured (no images, too few classes, bad path)."""


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8, N x 3 x S x S
    labels: torch.Tensor  # int64, N; indexes into class_names
    class_names: list[str]
    names: list[str]  # where each image came from, for messages and stable ordering
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> "ImageSet":
        index = torch.as_tensor(index, dtype=torch.long)
        kept = sorted(set(self.labels[index].tolist()))
        remap = torch.full((len(self.class_names),), -1, dtype=torch.long)
        remap[kept] = torch.arange(len(kept))
        return ImageSet(
            self.images[index], remap[self.labels[index]], [self.class_names[c] for c in kept],
            [self.names[i] for i in index.tolist()], self.skipped,
        )

    def floats(self) -> torch.Tensor:
        return self.images.float() / 255.0


@dataclass
class Split:
    train: ImageSet
    test: ImageSet
    gallery_index: torch.Tensor  # rows of `test` embedded by the gallery member
    query_index: torch.Tensor  # rows of `test` embedded by the query member

    @property
    def skipped(self) -> list[str]:
        return self.train.skipped


# ---------------------------------------------------------------------------------------------- reading


def _decode(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        return np.array(image, dtype=np.uint8)


def _image_sources(root: Path):
    """Yield (relative posix path, reader) for every image under a folder, a zip, or zips in a folder."""
    if root.is_file() and root.suffix == ".zip":
        zips = [root]
    elif root.is_dir():
        zips = sorted(root.glob("*.zip"))
        plain = [p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS]
        if plain:
            zips = []  # an extracted copy wins over archives lying beside it
            for path in plain:
                yield path.relative_to(root).as_posix(), path.read_bytes
    else:
        raise DataError(f"{root}: no such folder or .zip file")
    for archive in zips:
        with zipfile.ZipFile(archive) as handle:
            for info in sorted(handle.infolist(), key=lambda i: i.filename):
                if not info.is_dir() and PurePosixPath(info.filename).suffix.lower() in IMG_EXTENSIONS:
                    payload = handle.read(info.filename)
                    yield info.filename, (lambda payload=payload: payload)


def read_image_tree(root: str | Path, size: int, strip_top_level: bool = False) -> ImageSet:
    """Read every image below `root`; an image's class is its folder path.

    Unreadable files are skipped with a warning naming them.  With `strip_top_level`, the first folder
    level (a zip's own top folder, e.g. images_background_small1/) is dropped from class names, and images
    seen twice under the same class and file name are read once.
    """
    root = Path(root)
    by_key: dict[str, tuple[str, object]] = {}
    for rel, reader in _image_sources(root):
        parts = PurePosixPath(rel).parts
        if strip_top_level and len(parts) > 2:
            parts = parts[1:]
        if len(parts) < 2:
            continue  # images at the top level have no class folder
        by_key.setdefault("/".join(parts), (rel, reader))
    if not by_key:
        raise DataError(f"{root}: found no images ({', '.join(IMG_EXTENSIONS)}) in class folders")

    images, labels, names, skipped = [], [], [], []
    class_ids: dict[str, int] = {}
    for key in tqdm(sorted(by_key), desc=f"reading {root.name}", unit="img", leave=False, disable=None):
        rel, reader = by_key[key]
        try:
            pixels = _decode(reader(), size)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
            log.warning("skipping unreadable image %s: %s", f"{root}/{rel}", err)
            skipped.append(f"{root}/{rel}")
            continue
        class_name = str(PurePosixPath(key).parent)
        labels.append(class_ids.setdefault(class_name, len(class_ids)))
        images.append(torch.from_numpy(pixels).permute(2, 0, 1))
        names.append(key)
    if not images:
        raise DataError(f"{root}: none of the {len(by_key)} images could be read")
    return ImageSet(torch.stack(images), torch.tensor(labels), list(class_ids), names, skipped)


# ------------------------------------------------------------------------------------------- procedural


def procedural_glyphs(num_classes: int, samples_per_class: int, size: int, seed: int = 0) -> ImageSet:
    """Deterministic synthetic characters: each identity is a few random strokes, each sample a new hand.

    Like Omniglot, identities differ in shape and samples of one identity differ in jitter, stroke width
    and placement, so retrieval on unseen identities is a real (if easy) open-set task.
    """
    render = 64
    images, labels = [], []
    for identity in range(num_classes):
        rng = np.random.default_rng([seed, identity])
        strokes = [rng.uniform(0.15, 0.85, size=(3, 2)) for _ in range(rng.integers(2, 5))]
        for _ in range(samples_per_class):
            canvas = Image.new("L", (render, render), 255)
            draw = ImageDraw.Draw(canvas)
            shift = rng.normal(0, 0.04, size=2)
            angle = rng.normal(0, 0.12)
            rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
            width = int(rng.integers(3, 6))
            for control in strokes:
                points = (control - 0.5) @ rotation.T + 0.5 + shift + rng.normal(0, 0.025, size=control.shape)
                t = np.linspace(0, 1, 16)[:, None]
                curve = (1 - t) ** 2 * points[0] + 2 * (1 - t) * t * points[1] + t**2 * points[2]
                draw.line([tuple(p) for p in curve * render], fill=0, width=width, joint="curve")
            pixels = np.asarray(canvas.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
            images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
            labels.append(identity)
    names = [f"glyph{c:04d}/{i:02d}" for c in range(num_classes) for i in range(samples_per_class)]
    return ImageSet(torch.stack(images), torch.tensor(labels), [f"glyph{c:04d}" for c in range(num_classes)], names)


# ------------------------------------------------------------------------------------------------ split


def _group(class_name: str) -> str:
    return class_name.split("/")[0]


def split_open_set(data: ImageSet, test_groups: list[str] | None, test_fraction: float, seed: int) -> Split:
    """Split classes into train and test (disjoint), and test images into gallery and queries.

    Per test class, the first half of its images (in file order; Omniglot drawers 1-10) form the gallery
    and the rest the queries, so every query has relevant gallery items.
    """
    groups = sorted({_group(c) for c in data.class_names})
    if test_groups is not None:
        unknown = sorted(set(test_groups) - set(groups))
        if unknown:
            raise DataError(f"test_groups: {', '.join(unknown)} not found; available groups: {', '.join(groups)}")
        test_classes = {i for i, c in enumerate(data.class_names) if _group(c) in test_groups}
    else:
        order = torch.randperm(len(data.class_names), generator=torch.Generator().manual_seed(seed))
        test_classes = set(order[: max(2, round(test_fraction * len(order)))].tolist())
    in_test = torch.tensor([int(label) in test_classes for label in data.labels])
    if in_test.all() or not in_test.any():
        raise DataError("the open-set split left no training or no test classes; check test_groups/test_fraction")
    train, test = data.subset(torch.nonzero(~in_test).flatten()), data.subset(torch.nonzero(in_test).flatten())

    gallery, queries = [], []
    for label in range(len(test.class_names)):
        rows = torch.nonzero(test.labels == label).flatten().tolist()
        rows.sort(key=lambda r: test.names[r])
        if len(rows) < 2:
            continue  # a class with one image can be neither query nor gallery in a useful way
        half = math.ceil(len(rows) / 2)
        gallery += rows[:half]
        queries += rows[half:]
    if not queries:
        raise DataError("no test class has 2 or more images; retrieval cannot be evaluated")
    return Split(train, test, torch.tensor(gallery), torch.tensor(queries))


def load_split(data_cfg, load_size: int) -> Split:
    """Read (or generate) the configured dataset and split it open-set."""
    if data_cfg.source == "procedural":
        data = procedural_glyphs(data_cfg.num_classes, data_cfg.samples_per_class, load_size, data_cfg.split_seed)
        return split_open_set(data, None, data_cfg.test_fraction, data_cfg.split_seed)
    path = Path(data_cfg.path)
    if not path.exists():
        raise DataError(f"data.path: {path} does not exist")
    if data_cfg.source == "omniglot":
        data = read_image_tree(path, load_size, strip_top_level=True)
        test_groups = data_cfg.test_groups if data_cfg.test_groups is not None else OMNIGLOT_TEST_ALPHABETS
    else:
        data = read_image_tree(path, load_size)
        test_groups = data_cfg.test_groups
    split = split_open_set(data, test_groups, data_cfg.test_fraction, data_cfg.split_seed)
    split.test.skipped = []  # skipped files are reported once, through split.train.skipped
    return split


# --------------------------------------------------------------------------------------------- training


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images as floats in [0, 1] (baked into every member)."""
    x = images.float().div(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return [round(v, 6) for v in mean.tolist()], [round(v, 6) for v in std.tolist()]


class TrainImages(torch.utils.data.Dataset):
    """Augmented float images in [0, 1]; one augmentation per image, shared by every member."""

    def __init__(self, data: ImageSet, affine: bool = True, hflip: bool = False):
        self.data = data
        border = torch.cat([data.images[..., 0, :], data.images[..., -1, :]], dim=-1)
        fill = [int(v) for v in border.float().median(dim=-1).values.median(dim=0).values.tolist()]
        steps: list = []
        if affine:
            steps.append(v2.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.9, 1.1), shear=8, fill=fill))
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
        steps.append(v2.ToDtype(torch.float32, scale=True))
        self.transform = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        return self.transform(self.data.images[index]), self.data.labels[index]
