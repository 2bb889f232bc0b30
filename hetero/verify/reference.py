"""What verification compares an artifact against: held-out images, torch embeddings, the cloud gallery.

It comes from a family directory (:func:`reference_from_store`) or from a self-contained bundle
(:mod:`hetero.verify.bundle`); the checks in :mod:`hetero.verify` never know which.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hetero.maths import retrieval_metrics
from hetero.family import ArtifactRecord, FamilyStore, MemberRecord
from hetero.files import resolve_inside
from hetero.models import embed_images


@dataclass
class Reference:
    source: str
    root: Path  # artifact files are found under it (`artifact.file` is relative and must stay inside)
    family: str
    space_id: str  # the family's (manifest's)
    gallery_space_id: str  # the space of the gallery embeddings the queries are searched in
    cloud: str
    members: dict[str, MemberRecord]
    artifacts: list[ArtifactRecord]  # the artifacts to verify
    query_images: torch.Tensor  # uint8, N x 3 x S x S (held-out queries at the family's load size)
    query_labels: torch.Tensor
    gallery: torch.Tensor  # cloud-member embeddings of the gallery images
    gallery_labels: torch.Tensor
    torch_queries: dict[str, torch.Tensor]  # torch member -> embeddings of the queries
    torch_figures: dict[str, dict]  # member -> {"vs_cloud": metrics, "vs_self": metrics}
    profiles: dict[str, object] = field(default_factory=dict)  # name -> DeviceProfile (bundle or override)

    def query_floats(self) -> torch.Tensor:
        return self.query_images.float() / 255.0

    def artifact_path(self, artifact: ArtifactRecord) -> Path:
        return resolve_inside(self.root, artifact.file, f"{self.source}: file of artifact "
                                                        f"{artifact.member}@{artifact.profile}")


class ReferenceCache:
    """Torch embeddings of held-out queries and gallery, by family, checkpoints and query count.

    Reused within a process (repeated verifies, the pytest plugin, tests); at most `maxsize` families are
    kept, least recently used first out.
    """

    def __init__(self, maxsize: int = 2):
        from cachetools import LRUCache

        self._cache = LRUCache(maxsize=maxsize)

    def get(self, key, compute):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]


REFERENCES = ReferenceCache()


def _subset(index: torch.Tensor, count: int) -> torch.Tensor:
    """`count` rows spread evenly over `index` (queries are grouped by class, so not the first ones)."""
    if count >= len(index):
        return index
    return index[torch.linspace(0, len(index) - 1, count).round().long()]


def reference_from_store(store: FamilyStore, artifacts: list[ArtifactRecord], max_images: int | None = None,
                         profiles: dict | None = None, cache: ReferenceCache = REFERENCES) -> Reference:
    """Embed the held-out images with the torch members the artifacts need (and the cloud), once."""
    cloud = store.cloud.name
    needed = sorted({a.member for a in artifacts} | {cloud})
    for name in needed:  # checked against the manifest every time, even when the embeddings are cached
        store.checked_file(store.member(name).checkpoint, f"checkpoint of member {name!r}")
    key = (str(store.root.resolve()), json.dumps(store.config().to_dict(), sort_keys=True),
           tuple((name, store.member(name).checkpoint.sha256) for name in needed), max_images)
    query_images, query_labels, gallery, gallery_labels, torch_queries, figures = cache.get(
        key, lambda: _embed_held_out(store, needed, cloud, max_images))
    return Reference(
        source=str(store.root), root=store.root, family=store.name, space_id=store.space_id,
        gallery_space_id=store.space_id, cloud=cloud, members={m.name: m for m in store.members},
        artifacts=artifacts, query_images=query_images, query_labels=query_labels, gallery=gallery,
        gallery_labels=gallery_labels, torch_queries=dict(torch_queries), torch_figures=copy.deepcopy(figures),
        profiles=profiles or {})


def _embed_held_out(store: FamilyStore, needed: list[str], cloud: str, max_images: int | None):
    split = store.split()
    queries = _subset(split.query_index, max_images or store.config().export.verify_images)
    labels = split.test.labels
    query_images = split.test.images[queries]
    gallery_images = split.test.images[split.gallery_index].float() / 255.0
    torch_queries, torch_gallery = {}, {}
    for name in needed:  # each torch member embeds the queries and the gallery exactly once
        model = store.load_member(name)
        torch_queries[name] = embed_images(model, query_images.float() / 255.0)
        torch_gallery[name] = embed_images(model, gallery_images)
    query_labels, gallery_labels = labels[queries], labels[split.gallery_index]
    figures = {name: {"vs_cloud": retrieval_metrics(torch_queries[name], query_labels, torch_gallery[cloud],
                                                    gallery_labels),
                      "vs_self": retrieval_metrics(torch_queries[name], query_labels, torch_gallery[name],
                                                   gallery_labels)}
               for name in needed}
    return query_images, query_labels, torch_gallery[cloud], gallery_labels, torch_queries, figures
