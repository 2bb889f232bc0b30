"""Gallery images: listing them (a folder, a zip, or zips in a folder), reading them through the family's
decoder (`hetero.data.decode_image`, the one training uses), and the one loop that embeds them in batches
for every gallery path (build, import's proof, Milvus ingestion, search)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from hetero.data import (DEFAULT_BACKGROUND, DEFAULT_MAX_PIXELS, ImageEntry, ImageError, ImageReader, decode_image,
                         loader_context)
from hetero.data import list_images as data_list_images
from hetero.errors import DataError
from hetero.gallery.base import GalleryError

log = logging.getLogger("hetero.gallery")


def list_images(root: str | Path) -> list[ImageEntry]:
    """Every image below a folder, in a zip, or in zips in a folder (`hetero.data.list_images`, the listing
    training uses), by name: the same files give the same order (and the same shards) on every machine.

    Unlike training data, gallery images need no class folders; a zip's members are named after the zip when
    a folder holds several, so every name is unique.
    """
    try:
        entries = data_list_images(root, name_archives=True)
    except DataError as err:
        raise GalleryError(f"--images {err}") from None
    if not entries:
        raise GalleryError(f"--images {root}: found no image files (by extension) there")
    return sorted(entries, key=lambda e: e.name)


class ImageFiles(torch.utils.data.Dataset):
    """Decoded uint8 images (3 x size x size) of a listing; None for a file that cannot be used."""

    def __init__(self, entries: list[ImageEntry], size: int, background=DEFAULT_BACKGROUND,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.entries, self.size, self.background, self.max_pixels = entries, size, background, max_pixels
        self.reader = ImageReader()

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int):
        entry = self.entries[index]
        try:
            pixels = decode_image(self.reader.read(entry), self.size, self.background, self.max_pixels)
        except (ImageError, OSError) as err:
            log.warning("skipping unreadable image %s: %s", entry.name, err)
            return entry.name, None
        return entry.name, torch.from_numpy(pixels).permute(2, 0, 1)


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
