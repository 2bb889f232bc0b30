"""What one training batch costs: the loss of the members being trained, and the matching inputs (mixed,
rotated and reflected images) on which the label-free cross-model terms also compare each student with its
reference.

`family` below is the hetero.training.model.Family being trained (this room sits below it: Family.forward
calls family_loss).
"""
from __future__ import annotations

import torch
from torch.profiler import record_function

from hetero import distributed


def family_loss(family: torch.nn.Module, trained: list[str], images: torch.Tensor, labels: torch.Tensor,
                detach_cloud: bool, edge_classification: float = 1.0, mixed: torch.Tensor | None = None,
                mixed_matching: float = 0.0, cached: tuple | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one batch for the members being trained; the reference embedding is computed once.

    The reference is the cloud member's embedding, or in backward mode the earlier family's frozen cloud's,
    against which the new cloud is a query like the edge members.  The classification loss is a mean over
    this rank's images (DDP averages it over ranks); the cross-model terms, some of which compare every
    pair of the batch, see the global batch (gathered; alone a no-op).  `mixed` holds images made from the
    batch (see matching_inputs) for the label-free terms, weighted by `mixed_matching`.  `cached` holds the
    frozen cloud's embeddings of `images` and `mixed` read from the teacher cache (the cloud is not run).
    """
    cloud_emb = None
    mixing = mixed is not None and mixed_matching > 0 and bool(family.cross)
    mixed_reference = cached[1] if cached is not None else None
    if cached is not None:
        reference = cached[0]
    elif family.previous is not None:
        with torch.no_grad(), record_function("reference forward"):
            reference = family.embed(family.previous, images)
    elif family.cloud_name not in trained:
        # A frozen cloud in eval mode embeds each image on its own: the batch and its matching inputs go
        # through it in one forward (fewer, larger convolutions; the same embeddings).
        with torch.no_grad(), record_function("cloud forward (targets)"):
            both = family.embed(family.cloud, torch.cat([images, mixed]) if mixing else images)
        reference, mixed_reference = (both[:len(images)], both[len(images):]) if mixing else (both, None)
    else:
        with record_function("cloud forward"):
            cloud_emb = family.embed(family.cloud, images)
        reference = cloud_emb.detach() if detach_cloud else cloud_emb
    if family.cross:
        reference, all_labels = distributed.gather_with_grad(reference), distributed.gather_with_grad(labels)
    total = torch.zeros((), device=images.device)
    parts: dict[str, float] = {}
    for name in trained:
        member = family.members[name]
        is_reference = name == family.cloud_name and cloud_emb is not None
        if is_reference:
            outputs = [cloud_emb]
        else:
            with record_function(f"{name} forward"):
                outputs = family.embed_all(member, images)
        head = family.head(name)
        with record_function(f"{name} loss terms"):
            for tag, emb in zip(output_names(name, member, len(outputs)), outputs):
                loss = head(emb, None, labels) if head is not None else torch.zeros((), device=images.device)
                parts[f"{tag}/cls"] = loss.item()
                if name != family.cloud_name and "shared" in family.heads:
                    # Independent members (compat: none) have only their own classifier to learn from: never weighed.
                    loss = loss * edge_classification
                if not is_reference:
                    all_emb = distributed.gather_with_grad(emb) if family.cross else emb
                    for term, (weight, fn) in family.cross.items():
                        value = fn(all_emb, reference, all_labels)
                        parts[f"{tag}/{term}"] = value.item()
                        loss = loss + weight * value
                total = total + loss
            if len(outputs) > 1 and family.self_distillation > 0:
                total = total + family.self_distillation * deeper_teaches_shallower(outputs, parts, name)
    if mixing:
        total = total + mixed_matching * match_on_mixed_images(family, trained, mixed, parts, mixed_reference)
    return total, parts


def output_names(name: str, member, count: int) -> list[str]:
    """How a member's outputs are named in loss parts and reports: name@<stage> per exit of a multi-exit one."""
    return [name] if count == 1 else [f"{name}@{stage}" for stage in member.exits]


def deeper_teaches_shallower(outputs: list[torch.Tensor], parts: dict, name: str) -> torch.Tensor:
    """Each earlier exit regresses (1 - cos) onto the last exit's detached embedding of the same image."""
    deepest = outputs[-1].detach()
    value = sum((1 - (emb * deepest).sum(dim=1)).mean() for emb in outputs[:-1]) / (len(outputs) - 1)
    parts[f"{name}/self-distillation"] = value.item()
    return value


def mixup(images: torch.Tensor) -> torch.Tensor:
    """Each image blended with another of the batch at a uniform random ratio (drawn from the global RNG)."""
    mix = torch.rand(len(images), 1, 1, 1)
    return mix * images + (1 - mix) * images[torch.randperm(len(images))]


def cutmix(images: torch.Tensor) -> torch.Tensor:
    """Each image with a box of uniform random area pasted from another image of the batch."""
    n, _, h, w = images.shape
    side = torch.rand(n).sqrt()
    box_h, box_w = (side * h).long(), (side * w).long()
    top, left = (torch.rand(n) * (h - box_h + 1)).long(), (torch.rand(n) * (w - box_w + 1)).long()
    top, left, box_h, box_w = (t[:, None, None] for t in (top, left, box_h, box_w))
    rows, cols = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
    return torch.where(inside[:, None], images[torch.randperm(n)], images)


def dihedral(images: torch.Tensor) -> torch.Tensor:
    """Each image under one of the 8 rotations/reflections of the square, drawn at random."""
    choice = torch.randint(0, 8, (len(images),))
    out = images.clone()
    for k in range(8):
        rows = torch.nonzero(choice == k).flatten()
        if len(rows):
            view = torch.rot90(images[rows], k % 4, dims=(-2, -1))
            out[rows] = view.flip(-1) if k >= 4 else view
    return out


def matching_inputs(images: torch.Tensor, kinds: list[str]) -> torch.Tensor:
    """Inputs off the training images for function matching: mixed pairs, then rotated/reflected.

    With both mixup and cutmix, each image gets one of the two at random.
    """
    mixers = [MIXERS[k] for k in kinds if k in MIXERS]
    out = images
    if mixers:
        out = mixers[0](images)
        if len(mixers) > 1:
            pick = torch.randint(0, len(mixers), (len(images),))
            for index, mixer in enumerate(mixers[1:], start=1):
                out = torch.where((pick == index)[:, None, None, None], mixer(images), out)
    return dihedral(out) if "dihedral" in kinds else out


MIXERS = {"mixup": mixup, "cutmix": cutmix}


def match_on_mixed_images(family: torch.nn.Module, trained: list[str], mixed: torch.Tensor, parts: dict,
                          reference: torch.Tensor | None = None) -> torch.Tensor:
    """Function matching (Beyer et al., 2022): the label-free cross-model terms on mixed images.

    Mixed images (see matching_inputs) lie off the training images, where a student that only matched the
    reference on real images would drift; matching there is what carries over to unseen classes.
    `reference` holds the reference's embeddings of `mixed` when already computed (cache, batched forward).
    """
    queries = [name for name in trained if name != family.cloud_name or family.previous is not None]
    total = torch.zeros((), device=mixed.device)
    if not queries:  # the cloud phase: no student yet
        return total
    reference_model = family.previous if family.previous is not None else family.cloud
    with torch.no_grad(), record_function("reference forward (matching inputs)"):
        reference = distributed.gather_with_grad(reference if reference is not None
                                                 else family.embed(reference_model, mixed))
    for name in queries:
        member = family.members[name]
        with record_function(f"{name} forward"):
            outputs = family.embed_all(member, mixed)
        with record_function(f"{name} loss terms"):
            for tag, emb in zip(output_names(name, member, len(outputs)), outputs):
                emb = distributed.gather_with_grad(emb)
                for term, (weight, fn) in family.cross.items():
                    if not fn.uses_labels:
                        value = fn(emb, reference, None)
                        parts[f"{tag}/mixed-{term}"] = value.item()
                        total = total + weight * value
    return total
