"""The teacher cache: the cloud's embeddings of K augmented views per training image, computed once.

Running a large cloud on every augmented batch is what makes the edge phase slow.  Like MobileCLIP's
"reinforced" datasets, the cache stores, per training image and view, the augmentation's parameters, the
cloud's embedding of that view and of a matching input made from it (mixup/cutmix with a partner view, then
a rotation/reflection), so the edge phase recreates the images from the parameters (cheap) and reads the
cloud's answers instead of running the cloud.  A directory holds::

    cache.json                          the plan: cloud identity, images, views, augmentation, seed
    shards/shard-00000.safetensors      "params" [n, K, 14], "view" [n, K, D], "matching" [n, K, D]

Shards are written atomically one by one and a build resumes after the last finished one.  A cache made by
another cloud (or for other images, views or augmentation) is refused: its plan differs.  Training reads
the rows it needs from the shards with positioned reads (hetero.files.RowFile), so a cache of millions of
images costs disk, not resident memory.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from hetero.augment import AFFINE, augment, border_fill
from hetero.errors import ManifestError, TrainingError
from hetero.files import RowFile, atomic_write_json, check_output, resolve_inside, safetensors_rows, tensors_digest

PLAN = "cache.json"
FORMAT = "hetero-teacher-cache/1"
SHARD_IMAGES = 512
# Per (image, view): angle, dx, dy, scale, shear, hflip | partner, mixer (0 mixup, 1 cutmix, -1 none), mixup
# ratio, cutmix box (top, left, height, width as fractions) | dihedral (0-7, -1 none).  Floats throughout.
PARAMS = 14


def _generator(seed: int, image: int, view: int) -> torch.Generator:
    key = hashlib.sha256(f"{seed}|{image}|{view}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))


def draw_params(seed: int, image: int, view: int, images: int, affine: bool, hflip: bool, kinds: list[str]
                ) -> torch.Tensor:
    """The augmentation of one view and its matching input, from (seed, image, view) alone."""
    g = _generator(seed, image, view)
    u = lambda low, high: float(torch.empty(()).uniform_(low, high, generator=g))  # noqa: E731
    p = torch.full((PARAMS,), -1.0)
    p[:6] = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    if affine:
        p[:5] = torch.tensor([u(-AFFINE["degrees"], AFFINE["degrees"]), u(-AFFINE["translate"], AFFINE["translate"]),
                              u(-AFFINE["translate"], AFFINE["translate"]), u(*AFFINE["scale"]),
                              u(-AFFINE["shear"], AFFINE["shear"])])
    if hflip:
        p[5] = float(u(0, 1) < 0.5)
    p[6] = float(torch.randint(0, images, (), generator=g))
    mixers = [k for k in ("mixup", "cutmix") if k in kinds]
    if mixers:
        p[7] = float(("mixup", "cutmix").index(mixers[int(torch.randint(0, len(mixers), (), generator=g))]))
        p[8] = u(0, 1)
        side = math.sqrt(u(0, 1))
        p[9:13] = torch.tensor([u(0, 1) * (1 - side), u(0, 1) * (1 - side), side, side])
    if "dihedral" in kinds:
        p[13] = float(torch.randint(0, 8, (), generator=g))
    return p


def matching_images(views: torch.Tensor, partners: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """The matching inputs of a batch of views: mixed with their partners' views (mixup or cutmix, per row),
    then rotated/reflected (per row)."""
    n, _, h, w = views.shape
    ratio = params[:, 8].view(n, 1, 1, 1)
    mixed = torch.where((params[:, 7] == 0).view(n, 1, 1, 1), ratio * views + (1 - ratio) * partners, views)
    top, left = (params[:, 9] * h).long(), (params[:, 10] * w).long()
    bottom, right = top + (params[:, 11] * h).long(), left + (params[:, 12] * w).long()
    rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    inside = (rows >= top.view(n, 1, 1)) & (rows < bottom.view(n, 1, 1)) & (cols >= left.view(n, 1, 1)) & (
        cols < right.view(n, 1, 1))
    mixed = torch.where(((params[:, 7] == 1).view(n, 1, 1) & inside)[:, None], partners, mixed)
    out = mixed.clone()
    for turn in range(8):
        rows_ = torch.nonzero(params[:, 13] == turn).flatten()
        if len(rows_):
            view = torch.rot90(mixed[rows_], turn % 4, dims=(-2, -1))
            out[rows_] = view.flip(-1) if turn >= 4 else view
    return out


class TeacherCache:
    """The cloud's answers for the training images of one family config, built once and read per step."""

    def __init__(self, root: Path, plan: dict):
        self.root, self.plan = Path(root), plan
        self.views = plan["views"]
        self._shards: dict[int, dict[str, RowFile]] = {}

    def __getstate__(self):  # a loader worker maps the shards it reads itself
        return {**self.__dict__, "_shards": {}}

    @classmethod
    def plan_for(cls, cloud_identity: str, names: list[str], views: int, seed: int, load_size: int, affine: bool,
                 hflip: bool, kinds: list[str]) -> dict:
        images = hashlib.sha256("\n".join(names).encode()).hexdigest()
        return {"format": FORMAT, "cloud": cloud_identity, "images": len(names), "image_names_sha256": images,
                "views": views, "seed": seed, "load_size": load_size, "affine": affine, "hflip": hflip,
                "matching_inputs": sorted(kinds), "shard_images": SHARD_IMAGES}

    @classmethod
    def open_or_create(cls, root: Path, plan: dict) -> "TeacherCache":
        root = check_output(root, "train.teacher_cache.dir", folder=True)
        path = root / PLAN
        if path.is_file():
            try:
                found = json.loads(path.read_text())
            except (ValueError, OSError) as err:
                raise ManifestError(f"{path}: not a readable teacher cache plan ({err})") from None
            if found != plan:
                changed = sorted(k for k in set(found) | set(plan) if found.get(k) != plan.get(k))
                what = "another cloud" if "cloud" in changed else f"other settings ({', '.join(changed)})"
                raise ManifestError(f"{root}: a teacher cache made by {what}; it cannot serve this family. Delete it "
                                    f"or give train.teacher_cache.dir another folder")
        else:
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, plan)
        cache = cls(root, plan)
        for shard in sorted(set(range(cache.shards)) - set(cache.missing())):  # the shards already built
            cache._check_shard(shard)
        return cache

    def shard_path(self, shard: int) -> Path:
        return resolve_inside(self.root, f"shards/shard-{shard:05d}.safetensors", "teacher cache shard")

    @property
    def shards(self) -> int:
        return math.ceil(self.plan["images"] / SHARD_IMAGES)

    def missing(self) -> list[int]:
        return [s for s in range(self.shards) if not self.shard_path(s).is_file()]

    def _check_shard(self, shard: int) -> None:
        """Refuse a damaged shard (truncated, or other shapes) by name when the cache is opened: training
        reads shards inside its data loader, where an error could no longer say which file is at fault."""
        from safetensors import SafetensorError, safe_open

        path = self.shard_path(shard)
        rows = min(SHARD_IMAGES, self.plan["images"] - shard * SHARD_IMAGES)
        fix = "delete it and train again: missing shards are rebuilt"
        try:
            with safe_open(str(path), framework="pt") as handle:
                shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
                dtypes = {handle.get_slice(key).get_dtype() for key in handle.keys()}
        except (SafetensorError, OSError) as err:
            raise ManifestError(f"{path}: a damaged teacher cache shard ({err}); {fix}") from None
        if dtypes != {"F32"}:
            raise ManifestError(f"{path}: a teacher cache shard holding {sorted(dtypes)} values, not float32; {fix}")
        view = shapes.get("view", ())
        if shapes.get("params") != (rows, self.views, PARAMS) or shapes.get("matching") != view or \
                len(view) != 3 or view[:2] != (rows, self.views):
            raise ManifestError(f"{path}: a teacher cache shard holding {shapes}, not the {rows} images x "
                                f"{self.views} views its plan needs; {fix}")

    def build(self, cloud, images: torch.Tensor, fill: list[int], batch_size: int = 256,
              progress: bool | None = None) -> dict:
        """Embed every missing shard's views and matching inputs with `cloud`; return rows and seconds."""
        from hetero.family import save_weights
        from hetero.models import resize_to

        plan, started, rows = self.plan, time.time(), 0
        pending = self.missing()
        for shard in tqdm(pending, desc="teacher cache", unit="shard", leave=False,
                          disable=True if progress is False else None):
            first = shard * SHARD_IMAGES
            index = range(first, min(first + SHARD_IMAGES, plan["images"]))
            params = torch.stack([torch.stack([self._params(i, k) for k in range(self.views)]) for i in index])
            view_emb, match_emb = [], []
            rows_ = torch.tensor(list(index))
            for k in range(self.views):
                partner_params = torch.stack([self._params(int(j), k) for j in params[:, k, 6].long()])
                views, matches = self.inputs(images, rows_, params[:, k], params[:, k, 6].long(), partner_params,
                                             fill)
                view_emb.append(self._embed(cloud, views, batch_size, resize_to))
                match_emb.append(self._embed(cloud, matches, batch_size, resize_to))
            answers = {"view": torch.stack(view_emb, 1), "matching": torch.stack(match_emb, 1)}
            if not all(torch.isfinite(a).all() for a in answers.values()):  # never cache what no edge can learn from
                raise TrainingError(f"{self.root}: the cloud returns NaN or infinite embeddings for training images "
                                    f"{index.start}-{index.stop - 1}; check its weights or model file. Nothing of "
                                    f"them was cached")
            save_weights(self.shard_path(shard), {"params": params, **answers}, {"plan": plan})
            rows += len(index) * self.views
        return {"shards_built": len(pending), "rows": rows, "seconds": round(time.time() - started, 2)}

    def _params(self, image: int, view: int) -> torch.Tensor:
        plan = self.plan
        return draw_params(plan["seed"], image, view, plan["images"], plan["affine"], plan["hflip"],
                           plan["matching_inputs"])

    @staticmethod
    def inputs(images: torch.Tensor, index: torch.Tensor, params: torch.Tensor, partners: torch.Tensor,
               partner_params: torch.Tensor, fill: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the views, their matching inputs) of a batch of training images, as float images in [0, 1]."""
        views = augment(images[index], params, fill)
        return views, matching_images(views, augment(images[partners], partner_params, fill), params)

    @staticmethod
    @torch.no_grad()
    def _embed(cloud, batch: torch.Tensor, batch_size: int, resize_to) -> torch.Tensor:
        cloud.eval()
        return torch.cat([cloud(resize_to(batch[i:i + batch_size], cloud.input_size)).float()
                          for i in range(0, len(batch), batch_size)])

    def row(self, image: int, view: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(params, the cloud's view embedding, its matching-input embedding) of one image and view."""
        shard = image // SHARD_IMAGES
        if shard not in self._shards:
            path = self.shard_path(shard)
            if not path.is_file():
                raise ManifestError(f"{path}: missing; build the teacher cache first")
            self._shards[shard] = safetensors_rows(path)  # checked when the cache was opened
        arrays, offset = self._shards[shard], image - shard * SHARD_IMAGES
        return tuple(torch.from_numpy(arrays[name].read(offset, 1)[0, view])
                     for name in ("params", "view", "matching"))


class CachedViews(torch.utils.data.Dataset):
    """Training items for an edge phase that reads the teacher cache: view k of every image this epoch.

    An item is (image index, label, the cloud's two answers, the view's parameters, its partner's index and
    parameters); :meth:`images` makes the batch's views and matching inputs in one batched operation.
    """

    def __init__(self, cache: TeacherCache, data, fill: list[int]):
        self.cache, self.data, self.fill = cache, data, fill
        self.view = 0

    def set_epoch(self, epoch: int) -> None:
        self.view = (epoch - 1) % self.cache.views

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        params, reference, matching_reference = self.cache.row(index, self.view)
        partner = int(params[6])
        partner_params = self.cache.row(partner, self.view)[0]
        return index, self.data.labels[index], reference, matching_reference, params, partner, partner_params

    def images(self, index, params, partners, partner_params) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.inputs(self.data.images, index, params, partners, partner_params, self.fill)


def cloud_identity(cloud, external: str | None = None) -> str:
    """What names the cloud in a cache's plan: an external cloud's file fingerprint and preprocessing, or a
    trained cloud's tensors (so a cloud trained again, even with the same config, is another cloud)."""
    if external is not None:
        return f"external:{external}:{cloud.preprocessing}"
    return f"tensors:{tensors_digest(cloud.state_dict())}"


def plan_for_config(config, identity: str, data, views: int) -> dict:
    """The plan of a cache of `views` views of `data`'s images, augmented and matched as `config` trains."""
    data_cfg, train_cfg = config.data, config.train
    return TeacherCache.plan_for(identity, data.names, views, train_cfg.seed, config.load_size, data_cfg.augment_affine,
                                 data_cfg.augment_hflip,
                                 train_cfg.matching_inputs if train_cfg.mixed_matching > 0 else [])


def build_cached_views(root: Path, plan: dict, cloud, data, progress: bool | None = None
                       ) -> tuple[CachedViews, dict]:
    """Build (or resume, or reuse) the cache of `plan` with `cloud`; the training items that read it, and
    what the build did (its directory, views, rows and seconds)."""
    cache = TeacherCache.open_or_create(root, plan)
    fill = border_fill(data.images)
    built = cache.build(cloud, data.images, fill, progress=progress)
    return CachedViews(cache, data, fill), {"dir": str(root), "views": plan["views"], **built}
