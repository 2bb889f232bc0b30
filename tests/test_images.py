"""Decoding what users hand us: oversized headers, 16-bit greyscale, transparency; skipped files are named."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from hetero.config import DataConfig
from hetero.data import ImageError, decode_image, load_split


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header (and an empty image stream) that claims `width` x `height` pixels: a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def encode(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def write_classes(root, extra: dict[str, bytes]):
    """Two groups of classes with plain images, plus the given extra files in the first class."""
    for c in range(4):
        folder = root / ("a" if c < 2 else "b") / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20, 20), 40 * c + i, np.uint8)).save(folder / f"{i}.png")
    for name, data in extra.items():
        (root / "a" / "class0" / name).write_bytes(data)
    return root


@pytest.mark.parametrize("size", [(100_000, 100_000), (20_000, 10_000), (2**31 - 1, 2)])
def test_a_decompression_bomb_is_refused_from_its_header(size):
    with pytest.raises(ImageError, match="exceeds the limit|decompression bomb"):
        decode_image(png_claiming(*size), 32)


def test_bombs_and_unreadable_files_are_skipped_named_and_counted_in_training(tmp_path, caplog):
    root = write_classes(tmp_path / "data", {"bomb.png": png_claiming(12_000, 10_000), "junk.png": b"junk"})
    with caplog.at_level("WARNING", logger="hetero.data"):
        split = load_split(DataConfig(source="imagefolder", path=str(root), test_groups=["b"]), 16)
    assert sorted(split.skipped) == sorted([f"{root}/a/class0/bomb.png", f"{root}/a/class0/junk.png"])
    assert "exceeds the limit of 100,000,000 (data.max_image_pixels)" in caplog.text
    assert len(split.train) == 6


def test_the_pixel_cap_is_a_config_value(tmp_path):
    image = encode(Image.new("L", (64, 64), 128))
    assert decode_image(image, 16, max_pixels=64 * 64).shape == (16, 16, 3)
    with pytest.raises(ImageError, match="64 x 64 pixels exceeds the limit of 4,095"):
        decode_image(image, 16, max_pixels=64 * 64 - 1)
    with pytest.raises(Exception, match="max_image_pixels"):
        DataConfig(max_image_pixels=10**12)  # above what Pillow itself would ever open


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    values = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    data = encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")
    pixels = decode_image(data, 32).astype(int)
    expected = np.round(values / 257.0)
    assert np.abs(pixels[..., 0] - expected).max() <= 2  # scaled 0..65535 -> 0..255 (resampling rounds)
    assert (pixels[..., 0] == pixels[..., 1]).all() and 120 <= pixels[16, 16, 0] <= 136
    assert (pixels < 255).mean() > 0.9  # Pillow's own RGB conversion would have clipped nearly all to white


@pytest.mark.parametrize("make", [
    lambda: Image.fromarray(np.dstack([np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16), np.uint8)]), "RGBA"),
    lambda: Image.fromarray(np.dstack([np.full((16, 16, 3), 200, np.uint8), np.zeros((16, 16), np.uint8)]),
                            "RGBA"),
    lambda: Image.fromarray(np.dstack([np.zeros((16, 16), np.uint8), np.zeros((16, 16), np.uint8)]), "LA"),
])
def test_fully_transparent_pixels_take_the_background_whatever_colour_is_stored(make):
    """Two files that look identical (fully transparent) but store black or grey underneath decode alike."""
    data = encode(make())
    assert (decode_image(data, 16) == 255).all()
    assert (decode_image(data, 16, background=(0, 128, 0)) == [0, 128, 0]).all()


def test_palette_transparency_and_half_transparent_pixels_are_composited():
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([10, 20, 30, 250, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 8, 16))
    data = encode(palette, transparency=0)  # palette entry 0 (dark blue) is transparent
    pixels = decode_image(data, 16, background=(255, 255, 255))
    assert (pixels[:, :6] == [250, 0, 0]).all() and (pixels[:, 10:] == 255).all()
    half = Image.fromarray(np.dstack([np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 128, np.uint8)]), "RGBA")
    assert np.abs(decode_image(encode(half), 8).astype(int) - 127).max() <= 1  # black at 50% over white


def test_background_reaches_training_galleries_and_exported_metadata(tmp_path):
    transparent = Image.fromarray(np.zeros((20, 20, 4), np.uint8), "RGBA")
    root = write_classes(tmp_path / "data", {"clear.png": encode(transparent)})
    split = load_split(DataConfig(source="imagefolder", path=str(root), test_groups=["b"], background=[0, 0, 255]),
                       16)
    clear = split.train.names.index("a/class0/clear.png")
    assert (split.train.images[clear].permute(1, 2, 0) == split.train.images.new_tensor([0, 0, 255])).all()
    with pytest.raises(Exception, match=r"background"):
        DataConfig(background=[0, 0, 300])


def test_gallery_build_skips_a_bomb_and_names_it(tiny_family_dir, tmp_path):
    from hetero.family import FamilyStore
    from hetero.gallery import Gallery, build_gallery

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 20), 60 * i, np.uint8)).save(images / f"{i}.png")
    (images / "bomb.png").write_bytes(png_claiming(12_000, 10_000))
    record = build_gallery(FamilyStore.open(tiny_family_dir), images, tmp_path / "g", shard_size=4, batch_size=4)
    assert record["rows"] == 3 and record["skipped"] == 1 and "bomb.png" not in Gallery(tmp_path / "g").names()
