"""Training images as members see them: per-channel statistics, the colour an affine warp fills with, and
the augmentation (per image through torchvision, or a whole batch in one warp).  `TrainImages` wraps a
`hetero.data.ImageSet`."""
from __future__ import annotations

import torch
from torchvision.transforms import v2


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images as floats in [0, 1] (baked into every member)."""
    x = images.float().div(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return [round(v, 6) for v in mean.tolist()], [round(v, 6) for v in std.tolist()]


def border_fill(images: torch.Tensor) -> list[int]:
    """The median colour of the images' top and bottom rows: what an affine warp fills uncovered pixels with."""
    border = torch.cat([images[..., 0, :], images[..., -1, :]], dim=-1)
    return [int(v) for v in border.float().median(dim=-1).values.median(dim=0).values.tolist()]


AFFINE = dict(degrees=10.0, translate=0.08, scale=(0.9, 1.1), shear=8.0)  # the training augmentation's ranges


def random_affine_params(n: int, affine: bool, hflip: bool) -> torch.Tensor:
    """(n, 6) augmentation parameters for `augment`, drawn from the global RNG like RandomAffine's."""
    params = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0]).repeat(n, 1)
    if affine:
        low = torch.tensor([-AFFINE["degrees"], -AFFINE["translate"], -AFFINE["translate"], AFFINE["scale"][0],
                            -AFFINE["shear"]])
        high = torch.tensor([AFFINE["degrees"], AFFINE["translate"], AFFINE["translate"], AFFINE["scale"][1],
                             AFFINE["shear"]])
        params[:, :5] = low + torch.rand(n, 5) * (high - low)
    if hflip:
        params[:, 5] = (torch.rand(n) < 0.5).float()
    return params


def augment(images: torch.Tensor, params: torch.Tensor, fill: list[int]) -> torch.Tensor:
    """uint8 NCHW images under per-image affine/flip parameters (`params[:, :6]`), as floats in [0, 1].

    Params per image: angle, dx, dy (fractions of the side), scale, shear, hflip (> 0.5 flips).  The same
    inverse matrix and nearest sampling as torchvision's affine on tensors, for a whole batch in one
    grid_sample: per image, through torchvision, it was a fifth of a training step on Omniglot.
    """
    from torchvision.transforms.functional import _get_inverse_affine_matrix

    n, _, h, w = images.shape
    size = images.shape[-1]
    theta = torch.tensor([_get_inverse_affine_matrix([0.0, 0.0], float(p[0]), [round(float(p[1]) * size),
                                                     round(float(p[2]) * size)], float(p[3]), [float(p[4]), 0.0])
                          for p in params], dtype=torch.float32).view(n, 2, 3)
    base = torch.ones(h, w, 3)
    base[..., 0] = torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, steps=w)
    base[..., 1] = torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, steps=h).unsqueeze(-1)
    scaled = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h])
    grid = base.view(1, h * w, 3).expand(n, -1, -1).bmm(scaled).view(n, h, w, 2)
    x = torch.cat([images.float(), torch.ones(n, 1, h, w)], dim=1)
    x = torch.nn.functional.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    out, covered = x[:, :-1], x[:, -1:] >= 0.5
    out = torch.where(covered, out, torch.tensor(fill, dtype=torch.float32).view(1, 3, 1, 1))
    flip = params[:, 5] > 0.5
    out[flip] = out[flip].flip(-1)
    return out.div(255.0)


class TrainImages(torch.utils.data.Dataset):
    """Augmented float images in [0, 1]; one augmentation per image, shared by every member.

    `batched`: items are the uint8 images and `collate` augments a whole batch in one warp (`augment`);
    otherwise each item goes through torchvision's RandomAffine on its own.  Same ranges, other draws.
    """

    def __init__(self, data, affine: bool = True, hflip: bool = False, batched: bool = False):
        self.data, self.affine, self.hflip, self.batched = data, affine, hflip, batched
        self.fill = border_fill(data.images)
        steps: list = []
        if affine:
            steps.append(v2.RandomAffine(degrees=AFFINE["degrees"], translate=(AFFINE["translate"],) * 2,
                                         scale=AFFINE["scale"], shear=AFFINE["shear"], fill=self.fill))
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
        steps.append(v2.ToDtype(torch.float32, scale=True))
        self.transform = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        image = self.data.images[index]
        return (image if self.batched else self.transform(image)), self.data.labels[index]

    def collate(self, items):
        """A batch of items; with `batched`, augmented here, all images at once."""
        images, labels = torch.utils.data.default_collate(items)
        if self.batched:
            images = augment(images, random_affine_params(len(images), self.affine, self.hflip), self.fill)
        return images, labels
