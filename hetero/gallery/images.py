"""Gallery images: listing them (a folder, a zip, or zips in a folder), reading them through the family's
decoder (`hetero.data.decode_image`, the one training uses), and the one loop that embeds them in batches
for every gallery path (build, import's proof, Milvus ingestion, search)."""
from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

from hetero.data import DEFAULT_BACKGROUND, DEFAULT_MAX_PIXELS, ImageError, decode_image, loader_context
from hetero.gallery.base import GalleryError

log = logging.getLogger("hetero.gallery")


@dataclass(frozen=True)
class ImageEntry:
    name: str  # stable, unique name: path below the folder, or [zip name/]path inside the zip
    archive: str | None  # the zip that holds it, None for a plain file
    member: str  # path of the file (plain) or of the member inside `archive`


def _is_image(name: str) -> bool:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return PurePosixPath(name).suffix.lower() in IMG_EXTENSIONS


def list_images(root: str | Path) -> list[ImageEntry]:
    """Every image (any file Pillow may read, by extension) below a folder, in a zip, or in zips in a folder.

    Unlike training data, gallery images need no class folders; names are sorted, so the same files give
    the same order (and the same shards) on every machine.  A folder with plain images ignores zips beside
    them (an extracted copy wins), as the training reader does.
    """
    root = Path(root)
    if root.is_file() and root.suffix.lower() == ".zip":
        archives, prefix = [root], False
    elif root.is_dir():
        plain = [p for p in root.rglob("*") if p.is_file() and _is_image(p.name)]
        if plain:
            entries = [ImageEntry(p.relative_to(root).as_posix(), None, str(p)) for p in plain]
            return sorted(entries, key=lambda e: e.name)
        archives, prefix = sorted(root.glob("*.zip")), True
    else:
        raise GalleryError(f"--images {root}: no such folder or .zip file")
    entries = []
    for archive in archives:
        try:
            with zipfile.ZipFile(archive) as handle:
                names = [i.filename for i in handle.infolist() if not i.is_dir() and _is_image(i.filename)]
        except zipfile.BadZipFile as err:
            raise GalleryError(f"{archive}: not a readable zip file ({err})") from None
        entries += [ImageEntry(f"{archive.name}/{n}" if prefix else n, str(archive), n) for n in names]
    if not entries:
        raise GalleryError(f"--images {root}: found no image files (by extension) there")
    return sorted(entries, key=lambda e: e.name)


class ImageFiles(torch.utils.data.Dataset):
    """Decoded uint8 images (3 x size x size) of a listing; None for a file that cannot be used."""

    def __init__(self, entries: list[ImageEntry], size: int, background=DEFAULT_BACKGROUND,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.entries, self.size, self.background, self.max_pixels = entries, size, background, max_pixels
        self._zips: dict[str, zipfile.ZipFile] = {}  # per worker process, opened on first use

    def __len__(self) -> int:
        return len(self.entries)

    def _read(self, entry: ImageEntry) -> bytes:
        if entry.archive is None:
            return Path(entry.member).read_bytes()
        if entry.archive not in self._zips:
            self._zips[entry.archive] = zipfile.ZipFile(entry.archive)
        return self._zips[entry.archive].read(entry.member)

    def __getitem__(self, index: int):
        from hetero.data import MAX_FILE_BYTES

        entry = self.entries[index]
        try:
            data = self._read(entry)
            if len(data) > MAX_FILE_BYTES:
                raise ImageError(f"{len(data):,} bytes, over the limit of {MAX_FILE_BYTES:,} for one image")
            pixels = torch.from_numpy(decode_image(data, self.size, self.background, self.max_pixels)).permute(2, 0, 1)
        except (ImageError, OSError, zipfile.BadZipFile, KeyError, EOFError, NotImplementedError) as err:
            log.warning("skipping unreadable image %s: %s", entry.name, err)
            return entry.name, None
        return entry.name, pixels


def collate_images(items):
    names = [name for name, pixels in items if pixels is not None]
    skipped = [name for name, pixels in items if pixels is None]
    pixels = [p for _, p in items if p is not None]
    return names, skipped, (torch.stack(pixels) if pixels else None)



def in_batches(count: int, batch_size: int) -> list[list[int]]:
    """Listing positions 0..count-1 in consecutive batches of `batch_size` (the last one may be short)."""
    return [list(range(begin, min(begin + batch_size, count))) for begin in range(0, count, batch_size)]


def embed_batches(dataset: ImageFiles, batches, encode, input_size: int, workers: int | None = None,
                  device: torch.device | None = None):
    """(names, skipped names, embeddings) per batch of listing positions, in the order of `batches`.

    Every gallery path embeds through this loop, so they all see the same floats: uint8 pixels -> floats in
    [0, 1] (on `device`) -> the member's `input_size` (`resize_to`, as training does) -> `encode`.  The
    embeddings are None for a batch with no readable image.  With `workers` a DataLoader decodes ahead
    (0: in this process); None reads in this process without one, as a DataLoader draws its workers' seed
    from the global RNG even with no worker.  The caller chooses the grad mode (a torch member's loop runs
    under inference_mode; an exported artifact's runtime is called as it is).
    """
    from hetero.models import resize_to

    if workers is None:
        loaded = (collate_images([dataset[i] for i in batch]) for batch in batches)
    else:
        loaded = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                             collate_fn=collate_images, multiprocessing_context=loader_context(workers))
    for names, skipped, pixels in loaded:
        if pixels is None:
            yield names, skipped, None
            continue
        images = pixels if device is None else pixels.to(device)
        yield names, skipped, encode(resize_to(images.float().div(255.0), input_size))
