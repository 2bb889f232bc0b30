"""The `data` section: where the training images come from and how they are split, decoded and augmented,
and the labeled held-out set (`data.eval`) of a family trained on unlabeled images."""
from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic.dataclasses import dataclass

from hetero.config.validation import STRICT

# Pillow refuses images above twice its own decompression-bomb limit whatever we allow.
PILLOW_PIXEL_LIMIT = 178_956_970


@dataclass(config=STRICT)
class EvalDataConfig:
    """A labeled held-out set for a family trained on unlabeled images: its classes are the test classes.

    The same sources as `data`; `test_groups` or `test_fraction` pick the held-out classes as for `data`
    (Omniglot: the standard test alphabets), and `test_fraction: 1.0` takes every class of the set.
    """

    source: Literal["procedural", "omniglot", "imagefolder"]
    path: str | None = None
    test_groups: list[str] | None = None
    test_fraction: float = 1.0
    split_seed: int = 0
    num_classes: int = 200
    samples_per_class: int = 12

    @model_validator(mode="after")
    def _consistent(self):
        if self.source != "procedural" and not self.path:
            raise ValueError(f"path: eval source {self.source!r} needs a path (a folder or a .zip)")
        if not 0 < self.test_fraction <= 1:
            raise ValueError(f"test_fraction: must be in (0, 1], got {self.test_fraction}")
        return self


@dataclass(config=STRICT)
class DataConfig:
    # unlabeled: any folder or zip of images, no class structure; split by image into train and held-out.
    source: Literal["procedural", "omniglot", "imagefolder", "unlabeled"] = "procedural"
    path: str | None = None
    # unlabeled data: the share of images held out for the label-free figures.
    held_out_fraction: float = 0.1
    # A labeled held-out set to evaluate a family trained on unlabeled images (the compatibility matrix).
    eval: EvalDataConfig | None = None
    # Open-set split: test classes never appear in training.  Either whole top-level groups
    # (Omniglot alphabets, or the first folder level of an ImageFolder tree) or a random fraction.
    test_groups: list[str] | None = None
    test_fraction: float = 0.4
    split_seed: int = 0
    # Procedural data: identities and samples per identity.
    num_classes: int = 200
    samples_per_class: int = 12
    image_size: int | None = None  # load resolution; defaults to the largest member input size
    augment_affine: bool = True
    augment_hflip: bool = False
    # Augment a whole batch in one warp (hetero.augment.augment) instead of image by image through torchvision:
    # the same ranges, other random draws; it matters when a step is short (benchmarks/train_profile.py).
    augment_batched: bool = True
    # Transparent pixels (RGBA, LA, palette or colour-key transparency) are composited onto this RGB colour
    # in training, evaluation and galleries alike, and the exported metadata says so: what a file stores
    # under a fully transparent pixel differs from tool to tool and must not reach the model.
    background: list[int] = field(default_factory=lambda: [255, 255, 255])
    # Larger images (width x height, read from the header before decoding) are skipped and named, like
    # unreadable ones: a few bytes of PNG can claim gigapixels (a decompression bomb).
    max_image_pixels: Annotated[int, Field(ge=1, le=PILLOW_PIXEL_LIMIT)] = 100_000_000

    @field_validator("background")
    @classmethod
    def _rgb(cls, value: list[int]) -> list[int]:
        if len(value) != 3 or not all(0 <= v <= 255 for v in value):
            raise ValueError(f"must be an RGB colour [r, g, b] with values 0-255, got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.source in ("omniglot", "imagefolder", "unlabeled") and not self.path:
            raise ValueError(f"path: data source {self.source!r} needs a path (a folder or a .zip)")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction: must be in (0, 1), got {self.test_fraction}")
        if not 0 < self.held_out_fraction < 1:
            raise ValueError(f"held_out_fraction: must be in (0, 1), got {self.held_out_fraction}")
        if self.eval is not None and self.source != "unlabeled":
            raise ValueError("eval: a labeled eval set is for `source: unlabeled`; labeled data holds its own "
                             "test classes")
        if self.num_classes < 4:
            raise ValueError(f"num_classes: must be >= 4, got {self.num_classes}")
        if self.samples_per_class < 2:
            raise ValueError(f"samples_per_class: must be >= 2, got {self.samples_per_class}")
        if self.image_size is not None and not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size: must be between 16 and 1024 pixels, got {self.image_size}")
        return self
