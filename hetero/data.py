"""Datasets: image folders (plain or zipped, Omniglot included) and a built-in procedural one.

Images are decoded once into a uint8 tensor at the family's load size; every member then receives the
same (augmented) batch and resizes it to its own input size.  Splits are by class (open-set): the
evaluation classes never appear in training.
"""
from __future__ import annotations

import io
import logging
import math
import multiprocessing
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from struct import error as struct_error

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from hetero.errors import DataError

log = logging.getLogger("hetero.data")

OMNIGLOT_TEST_ALPHABETS = ["Japanese_(katakana)", "Sanskrit", "Tagalog"]
DEFAULT_BACKGROUND = (255, 255, 255)
DEFAULT_MAX_PIXELS = 100_000_000
MAX_FILE_BYTES = 256 << 20  # one encoded image; larger files are skipped before they are read
HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageError(ValueError):
    """One image that cannot be used (unreadable, too large); callers skip it and name it."""


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

    def spread(self, count: int) -> torch.Tensor:
        """`count` images spread evenly over the set, as floats: in a class-grouped set every class contributes."""
        index = torch.linspace(0, len(self) - 1, min(count, len(self))).round().long().unique()
        return self.images[index].float() / 255.0


@dataclass
class Split:
    train: ImageSet
    test: ImageSet
    gallery_index: torch.Tensor  # rows of `test` embedded by the gallery member
    query_index: torch.Tensor  # rows of `test` embedded by the query member
    # Unlabeled data: images held out of training for the label-free figures.  Without a labeled eval set,
    # `test` is these images too, each its own class and both gallery and query (self-retrieval).
    held_out: ImageSet | None = None
    labeled: bool = True  # whether `test` has real classes (a compatibility matrix means something)

    @property
    def skipped(self) -> list[str]:
        return self.train.skipped


# ---------------------------------------------------------------------------------------------- reading


def decode_image(data: bytes, size: int, background=DEFAULT_BACKGROUND,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """RGB uint8 pixels (size x size x 3) of an encoded image, or ImageError saying why not.

    The header's width x height is checked against `max_pixels` before anything is decoded (a few bytes of
    PNG can claim gigapixels).  16-bit greyscale is scaled from 0..65535 to 0..255 (Pillow's RGB conversion
    would clip it to white), and transparent pixels are composited onto `background`, never decoded as
    whatever colour the file happens to store under them.
    """
    try:
        with warnings.catch_warnings():
            # Our own limit decides (Pillow's warning between its limit and ours is not an error here), and
            # Pillow's notes on damaged files are noise beside the skip message of a file that fails.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageError(f"{width} x {height} pixels exceeds the limit of {max_pixels:,} "
                                     f"(data.max_image_pixels)")
                rgb = _to_rgb(image, background)
                return np.array(rgb.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(f"refused by Pillow as a decompression bomb: {err}") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError, MemoryError, TypeError,
            IndexError, KeyError, ZeroDivisionError, struct_error) as err:
        raise ImageError(f"{type(err).__name__}: {err}") from None


def _to_rgb(image: Image.Image, background) -> Image.Image:
    if image.mode in HIGH_BIT_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode != "I" or values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(np.round(values * (255.0 / peak)), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        raise ImageError("floating-point images (mode F) have no agreed range; convert them to 8 or 16 bit")
    transparent = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not transparent:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def loader_context(workers: int):
    """The start method for DataLoader workers: never fork a process that may hold threads.

    A converter (litert-torch pulls in JAX) starts threads; forking such a process can deadlock the child.
    forkserver children come from a clean server process instead.  None (no workers, or no forkserver).
    """
    if workers == 0 or "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    return multiprocessing.get_context("forkserver")


@dataclass(frozen=True)
class ImageEntry:
    name: str  # its relative posix path: below the folder, or inside the zip ([zip name/] with name_archives)
    archive: str | None  # the zip that holds it, None for a plain file
    member: str  # path of the file (plain) or of the member inside `archive`
    size: int  # bytes, as listed (a zip member's uncompressed size)


def is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMG_EXTENSIONS


def list_images(root: str | Path, name_archives: bool = False) -> list[ImageEntry]:
    """Every image (by extension) below a folder, in a zip, or in zips in a folder; nothing is read yet.

    A folder with plain images ignores zips beside them (an extracted copy wins).  Files come in path order,
    zips in name order and their members in name order.  With `name_archives`, members of zips found in a
    folder are named `<zip name>/<member>`, so two zips holding the same path give two names.
    """
    root = Path(root)
    if root.is_file() and root.suffix.lower() == ".zip":
        archives = [root]
    elif root.is_dir():
        plain = [p for p in sorted(root.rglob("*")) if p.is_file() and is_image_name(p.name)]
        if plain:
            return [ImageEntry(p.relative_to(root).as_posix(), None, str(p), p.stat().st_size) for p in plain]
        archives = sorted(root.glob("*.zip"))
    else:
        raise DataError(f"{root}: no such folder or .zip file")
    entries = []
    for archive in archives:
        try:
            with zipfile.ZipFile(archive) as handle:
                infos = sorted((i for i in handle.infolist() if not i.is_dir() and is_image_name(i.filename)),
                               key=lambda i: i.filename)
        except (zipfile.BadZipFile, OSError) as err:
            raise DataError(f"{archive}: not a readable zip file ({err})") from None
        prefix = f"{archive.name}/" if name_archives and root.is_dir() else ""
        entries += [ImageEntry(prefix + i.filename, str(archive), i.filename, i.file_size) for i in infos]
    return entries


class ImageReader:
    """The bytes of listed images, one at a time (never a whole zip in memory); each zip is opened once, on
    first use, in the process that reads (a dataset's reader is copied to its loader workers unopened)."""

    def __init__(self):
        self._zips: dict[str, zipfile.ZipFile] = {}

    def __getstate__(self):
        return {"_zips": {}}

    def read(self, entry: ImageEntry) -> bytes:
        """The file's bytes; ImageError for one that is too large or cannot be read from its archive."""
        if entry.size > MAX_FILE_BYTES:
            raise ImageError(f"the file is {entry.size:,} bytes, over the limit of {MAX_FILE_BYTES:,} for one image")
        if entry.archive is None:
            data = Path(entry.member).read_bytes()
        else:
            try:
                if entry.archive not in self._zips:
                    self._zips[entry.archive] = zipfile.ZipFile(entry.archive)
                data = self._zips[entry.archive].read(entry.member)
            except (zipfile.BadZipFile, KeyError, EOFError, NotImplementedError, RuntimeError) as err:
                raise ImageError(f"cannot be read from its archive: {type(err).__name__}: {err}") from None
        if len(data) > MAX_FILE_BYTES:  # it grew since it was listed
            raise ImageError(f"the file is {len(data):,} bytes, over the limit of {MAX_FILE_BYTES:,} for one image")
        return data

    def close(self) -> None:
        for handle in self._zips.values():
            handle.close()
        self._zips.clear()


UNLABELED = "unlabeled"


def read_image_tree(root: str | Path, size: int, strip_top_level: bool = False, background=DEFAULT_BACKGROUND,
                    max_pixels: int = DEFAULT_MAX_PIXELS, labeled: bool = True) -> ImageSet:
    """Read every image below `root`; an image's class is its folder path (unlabeled: one class for all).

    Unreadable files are skipped with a warning naming them.  With `strip_top_level`, the first folder
    level (a zip's own top folder, e.g. images_background_small1/) is dropped from class names, and images
    seen twice under the same class and file name are read once.
    """
    root = Path(root)
    by_key: dict[str, ImageEntry] = {}
    for entry in list_images(root):
        parts = PurePosixPath(entry.name).parts
        if strip_top_level and len(parts) > 2:
            parts = parts[1:]
        if len(parts) < 2 and labeled:
            continue  # images at the top level have no class folder
        by_key.setdefault("/".join(parts), entry)
    if not by_key:
        where = "in class folders" if labeled else "anywhere below it"
        raise DataError(f"{root}: found no images ({', '.join(IMG_EXTENSIONS)}) {where}")

    images, labels, names, skipped = [], [], [], []
    class_ids: dict[str, int] = {}
    reader = ImageReader()
    for key in tqdm(sorted(by_key), desc=f"reading {root.name}", unit="img", leave=False, disable=None):
        entry = by_key[key]
        try:
            pixels = decode_image(reader.read(entry), size, background, max_pixels)
        except (ImageError, OSError) as err:
            log.warning("skipping unreadable image %s: %s", f"{root}/{entry.name}", err)
            skipped.append(f"{root}/{entry.name}")
            continue
        class_name = str(PurePosixPath(key).parent) if labeled else UNLABELED
        labels.append(class_ids.setdefault(class_name, len(class_ids)))
        images.append(torch.from_numpy(pixels).permute(2, 0, 1))
        names.append(key)
    reader.close()
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


def split_open_set(data: ImageSet, test_groups: list[str] | None, test_fraction: float, seed: int,
                   need_train: bool = True) -> Split:
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
    if (in_test.all() and need_train) or not in_test.any():
        raise DataError("the open-set split left no training or no test classes; check test_groups/test_fraction")
    train, test = data.subset(torch.nonzero(~in_test).flatten()), data.subset(torch.nonzero(in_test).flatten())

    gallery, queries = gallery_and_queries(test.labels, test.names)
    if not len(queries):
        raise DataError("no test class has 2 or more images; retrieval cannot be evaluated")
    return Split(train, test, gallery, queries)


def gallery_and_queries(labels: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(gallery rows, query rows): per class, the first half of its images in file order and the rest; a
    class with one image can be neither query nor gallery in a useful way and is left out."""
    gallery, queries = [], []
    for label in torch.unique(labels).tolist():
        rows = sorted(torch.nonzero(labels == label).flatten().tolist(), key=lambda r: names[r])
        if len(rows) < 2:
            continue
        half = math.ceil(len(rows) / 2)
        gallery += rows[:half]
        queries += rows[half:]
    return torch.tensor(gallery, dtype=torch.long), torch.tensor(queries, dtype=torch.long)


def load_split(data_cfg, load_size: int) -> Split:
    """Read (or generate) the configured dataset and split it open-set (unlabeled data: by image)."""
    if data_cfg.source == "unlabeled":
        return _unlabeled_split(data_cfg, load_size)
    if data_cfg.source == "procedural":
        data = procedural_glyphs(data_cfg.num_classes, data_cfg.samples_per_class, load_size, data_cfg.split_seed)
        return split_open_set(data, None, data_cfg.test_fraction, data_cfg.split_seed)
    path = Path(data_cfg.path)
    if not path.exists():
        raise DataError(f"data.path: {path} does not exist")
    omniglot = data_cfg.source == "omniglot"
    data = read_image_tree(path, load_size, strip_top_level=omniglot, background=data_cfg.background,
                           max_pixels=data_cfg.max_image_pixels)
    test_groups = data_cfg.test_groups
    if omniglot and test_groups is None:
        test_groups = OMNIGLOT_TEST_ALPHABETS
    split = split_open_set(data, test_groups, data_cfg.test_fraction, data_cfg.split_seed)
    split.test.skipped = []  # skipped files are reported once, through split.train.skipped
    return split


def _unlabeled_split(data_cfg, load_size: int) -> Split:
    """Images split by image into train and held-out; `test` is the labeled eval set when one is given."""
    path = Path(data_cfg.path)
    if not path.exists():
        raise DataError(f"data.path: {path} does not exist")
    data = read_image_tree(path, load_size, background=data_cfg.background, max_pixels=data_cfg.max_image_pixels,
                           labeled=False)
    if len(data) < 4:
        raise DataError(f"data.path: {path} holds {len(data)} readable image(s); unlabeled training needs at least 4")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(data_cfg.split_seed))
    held = max(2, round(data_cfg.held_out_fraction * len(data)))
    held_out, train = data.subset(order[:held].sort().values), data.subset(order[held:].sort().values)
    if data_cfg.eval is not None:
        labeled = load_eval_split(data_cfg, load_size)
        return Split(train, labeled.test, labeled.gallery_index, labeled.query_index, held_out, labeled=True)
    own = ImageSet(held_out.images, torch.arange(len(held_out)), list(held_out.names), held_out.names)
    everything = torch.arange(len(held_out))
    return Split(train, own, everything, everything, held_out, labeled=False)


def load_eval_split(data_cfg, load_size: int) -> Split:
    """The labeled eval set of unlabeled data: its held-out classes (all of them at test_fraction 1.0)."""
    cfg = data_cfg.eval
    if cfg.source == "procedural":
        data = procedural_glyphs(cfg.num_classes, cfg.samples_per_class, load_size, cfg.split_seed)
    else:
        if not Path(cfg.path).exists():
            raise DataError(f"data.eval.path: {cfg.path} does not exist")
        data = read_image_tree(cfg.path, load_size, strip_top_level=cfg.source == "omniglot",
                               background=data_cfg.background, max_pixels=data_cfg.max_image_pixels)
    groups = cfg.test_groups
    if cfg.source == "omniglot" and groups is None:
        groups = OMNIGLOT_TEST_ALPHABETS
    if groups is None and cfg.test_fraction >= 1:
        groups = sorted({_group(c) for c in data.class_names})
    split = split_open_set(data, groups, cfg.test_fraction, cfg.split_seed, need_train=False)
    split.test.skipped = []
    return split


def calibration_split(train: ImageSet, fraction: float, by: str = "classes", seed: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows trained on, rows held out) of a training set, for calibrating multi-exit members.

    `classes`: a seeded draw of `fraction` of the classes (at least 2, at least one left), every image of
    them; a training set of fewer than 3 classes (unlabeled data) holds out images instead.  `groups`: whole
    groups of classes (class names' top folders) in a seeded order until `fraction` of the classes are out
    (at least one group, at least one left); a training set of one group holds out classes.  `images`: per
    class, the last `fraction` of its images (in file order, at least one kept for training)."""
    groups = sorted({_group(name) for name in train.class_names})
    if by == "groups" and len(groups) >= 2:
        order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
        chosen, count = set(), 0
        for index in order[:-1]:
            chosen.add(groups[index])
            count += sum(_group(name) == groups[index] for name in train.class_names)
            if count >= fraction * len(train.class_names):
                break
        in_chosen = torch.tensor([_group(name) in chosen for name in train.class_names])
        held_out = in_chosen[train.labels]
        return torch.nonzero(~held_out).flatten(), torch.nonzero(held_out).flatten()
    classes = torch.unique(train.labels)
    by = "classes" if by == "groups" else by
    if by == "classes" and len(classes) >= 3:
        count = min(max(2, math.ceil(fraction * len(classes))), len(classes) - 1)
        order = torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed))
        held_out = torch.isin(train.labels, classes[order[:count]])
        return torch.nonzero(~held_out).flatten(), torch.nonzero(held_out).flatten()
    keep, held = [], []
    for label in classes.tolist():
        rows = torch.nonzero(train.labels == label).flatten()
        out = min(math.ceil(fraction * len(rows)), len(rows) - 1)
        keep.append(rows[:len(rows) - out])
        held.append(rows[len(rows) - out:])
    return torch.cat(keep), torch.cat(held)
