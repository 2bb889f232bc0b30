"""One registry of architectures, and the embedding member every family is made of.

An architecture builder takes width and depth multipliers and returns a backbone (image -> feature map
channels).  Besides hetero's own scalable CNNs, any image backbone of timm (``timm/<name>``) or torchvision
(``torchvision/<name>``) is a registered architecture: built without its classifier, at its own width and
depth, optionally from a local safetensors file (nothing is downloaded; hub weights are the user's to fetch).  :class:`Embedder` wraps any backbone with the embedding contract: RGB floats in [0, 1] at the
member's input size in, an L2-normalised float32 vector of the family dimension out, with the input
normalisation inside the graph so exported files carry it too.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock
from torchvision.ops.misc import Conv2dNormActivation

# name -> builder(width, depth, **blocks) -> (backbone, feature channels); `blocks` are per-block options
# (mobilenet's expand_ratios and kernel_sizes) that only some builders take.
ARCHITECTURES: dict[str, Callable[..., tuple[nn.Module, int]]] = {}
BLOCK_OPTIONS = {"mobilenet": ("expand_ratios", "kernel_sizes")}


def register(name: str):
    def wrap(builder):
        ARCHITECTURES[name] = builder
        return builder

    return wrap


def _channels(base: int, width: float) -> int:
    return max(8, int(round(base * width / 8)) * 8)


def _blocks(base: int, depth: float) -> int:
    return max(1, int(round(base * depth)))


@register("resnet")
def relu_resnet(width: float, depth: float) -> tuple[nn.Module, int]:
    """ReLU residual CNN (torchvision BasicBlocks): quantisation-friendly, scales by width and depth."""
    widths = [_channels(c, width) for c in (32, 64, 128, 256)]
    layers: list[nn.Module] = [Conv2dNormActivation(3, widths[0], 3, stride=2)]
    in_ch, ends = widths[0], []
    for stage, out_ch in enumerate(widths):
        for block in range(_blocks(2, depth)):
            stride = 2 if stage > 0 and block == 0 else 1
            downsample = None
            if stride != 1 or in_ch != out_ch:
                downsample = nn.Sequential(
                    nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
                )
            layers.append(BasicBlock(in_ch, out_ch, stride=stride, downsample=downsample))
            in_ch = out_ch
        ends.append(len(layers))
    return _staged(nn.Sequential(*layers), ends, widths), in_ch


# (expand ratio, channels, blocks, stride) per stage, MobileNetV2-like, sized for small inputs.
MOBILENET_STAGES = [(1, 16, 1, 1), (4, 24, 2, 2), (4, 48, 2, 2), (4, 96, 3, 2), (4, 160, 2, 2)]
KERNEL_SIZES = (3, 5, 7)  # depthwise kernel sizes a mobilenet block may have


def mobilenet_defaults(depth: float) -> tuple[list[float], list[int]]:
    """The per-block expansion ratios and depthwise kernel sizes of the registry's mobilenet at `depth`."""
    ratios = [float(expand) for expand, _, blocks, _ in MOBILENET_STAGES for _ in range(_blocks(blocks, depth))]
    return ratios, [3] * len(ratios)


def check_mobilenet_blocks(depth: float, expand_ratios, kernel_sizes) -> None:
    """ValueError naming the field and the value when the per-block lists do not fit a mobilenet of `depth`."""
    count = len(mobilenet_defaults(depth)[0])
    for field, values in (("expand_ratios", expand_ratios), ("kernel_sizes", kernel_sizes)):
        if values is not None and len(values) != count:
            raise ValueError(f"{field}: a mobilenet of depth {depth:g} has {count} blocks, so one value per block "
                             f"({count}); got {len(values)}: {list(values)}")
    for ratio in expand_ratios or []:
        if not 0 < ratio <= 16:
            raise ValueError(f"expand_ratios: {ratio!r} is not an expansion ratio in (0, 16]")
    for kernel in kernel_sizes or []:
        if kernel not in KERNEL_SIZES:
            raise ValueError(f"kernel_sizes: {kernel!r} is not a depthwise kernel size; one of "
                             f"{', '.join(map(str, KERNEL_SIZES))}")


@register("mobilenet")
def relu_mobilenet(width: float, depth: float, expand_ratios: list[float] | None = None,
                   kernel_sizes: list[int] | None = None) -> tuple[nn.Module, int]:
    """Mobile-style family from torchvision's inverted residual blocks (ReLU6, no squeeze-excite).

    `expand_ratios` and `kernel_sizes`: one per block (None: the stage's ratio, kernel 3), so that every
    sub-network of an elastic mobilenet (Once-for-All's expansion and kernel genes) is a member of its own.
    """
    check_mobilenet_blocks(depth, expand_ratios, kernel_sizes)
    default_ratios, default_kernels = mobilenet_defaults(depth)
    ratios, kernels = iter(expand_ratios or default_ratios), iter(kernel_sizes or default_kernels)
    in_ch = _channels(32, width)
    layers: list[nn.Module] = [Conv2dNormActivation(3, in_ch, 3, stride=2, activation_layer=nn.ReLU6)]
    ends, widths = [], []
    for _, channels, blocks, stride in MOBILENET_STAGES:
        out_ch = _channels(channels, width)
        for block in range(_blocks(blocks, depth)):
            layers.append(_inverted_residual(in_ch, out_ch, stride if block == 0 else 1, next(ratios), next(kernels)))
            in_ch = out_ch
        ends.append(len(layers))
        widths.append(out_ch)
    last = _channels(320, width)
    layers.append(Conv2dNormActivation(in_ch, last, 1, activation_layer=nn.ReLU6))
    ends[-1], widths[-1] = len(layers), last  # the last 1x1 conv belongs to the last stage
    backbone = _staged(nn.Sequential(*layers), ends, widths)
    backbone.tail = 1  # the last 1x1 conv: after the last stage's blocks, whatever its depth
    return backbone, last


def _inverted_residual(in_ch: int, out_ch: int, stride: int, expand: float, kernel: int) -> InvertedResidual:
    """torchvision's block with a depthwise kernel of `kernel` (its own is 3x3): the same module names, so a
    kernel-3 block's state dict is torchvision's."""
    block = InvertedResidual(in_ch, out_ch, stride, expand)
    if kernel != 3:
        depthwise = 1 if expand != 1 else 0  # after the 1x1 expansion, when there is one
        hidden = block.conv[depthwise][0].out_channels
        block.conv[depthwise] = Conv2dNormActivation(hidden, hidden, kernel, stride=stride, groups=hidden,
                                                     activation_layer=nn.ReLU6)
    return block


def _staged(backbone: nn.Sequential, ends: list[int], widths: list[int]) -> nn.Sequential:
    """Mark where each stage of a backbone ends (layer index) and its width: multi-exit members cut there.
    `tail`: layers at the end of the last stage that are not blocks (none by default)."""
    backbone.stage_ends, backbone.stage_widths, backbone.tail = ends, widths, 0
    return backbone


def stage_count(arch: str) -> int | None:
    """Stages of one of hetero's own architectures (where exits may go); None for a library backbone."""
    if arch not in ARCHITECTURES:
        return None
    return len(ARCHITECTURES[arch](0.25, 0.25)[0].stage_ends)


LIBRARY_PREFIXES = ("timm/", "torchvision/")
# The attribute holding a torchvision classifier, per model family; replaced by Identity to get pooled features.
TORCHVISION_HEADS = ("fc", "classifier", "heads", "head")


def is_library_arch(arch: str) -> bool:
    return arch.startswith(LIBRARY_PREFIXES)


def library_models(prefix: str) -> list[str]:
    """The model names a library offers under `prefix` ("timm/" or "torchvision/")."""
    if prefix == "timm/":
        try:
            import timm
        except ImportError:
            return []
        return timm.list_models()
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def architecture_known(arch: str) -> bool:
    if arch in ARCHITECTURES:
        return True
    prefix = next((p for p in LIBRARY_PREFIXES if arch.startswith(p)), None)
    return prefix is not None and arch[len(prefix):] in library_models(prefix)


def library_backbone(arch: str, pretrained: bool = False) -> tuple[nn.Module, int]:
    """A timm or torchvision model without its classifier (pooled features out), and its feature width;
    with `pretrained`, holding its library's default pretrained weights, found as that library finds them."""
    prefix, name = arch.split("/", 1)
    if prefix == "timm":
        try:
            import timm
        except ImportError:
            raise KeyError(f"architecture {arch!r} needs timm: pip install timm") from None
        model = timm.create_model(name, pretrained=pretrained, num_classes=0)
    else:
        import torchvision

        model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None)
        head = next((h for h in TORCHVISION_HEADS if isinstance(getattr(model, h, None), nn.Module)), None)
        if head is None:
            raise KeyError(f"architecture {arch!r}: no classifier attribute ({', '.join(TORCHVISION_HEADS)}) to "
                           f"remove")
        setattr(model, head, nn.Identity())
    # The pooled width, as run: some models add a head layer after `num_features` (MobileNetV3's 1024).
    model.eval()
    side = 224 if "vit" in name else 64
    with torch.no_grad():
        features = model(torch.zeros(1, 3, side, side))
    return model, int(features.flatten(1).shape[1])


def load_backbone_weights(backbone: nn.Module, path, arch: str) -> None:
    """Initialise a library backbone from a local safetensors file; classifier weights in it are ignored.

    A file for another architecture is refused naming the first key that does not fit.
    """
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    expected = backbone.state_dict()
    classifier = tuple(f"{h}." for h in TORCHVISION_HEADS)
    extra = [k for k in tensors if k not in expected and not k.startswith(classifier)]
    mismatch = first_mismatch(tensors, expected, sorted(set(expected) | set(extra)))
    if mismatch:
        raise ValueError(f"{path}: does not fit {arch}: {mismatch}")
    backbone.load_state_dict({k: tensors[k] for k in expected})


def load_pretrained(backbone: nn.Module, arch: str) -> None:
    """Initialise a library backbone with its library's pretrained weights: timm's from the Hugging Face hub,
    torchvision's from torch.hub, each through its own cache, so a machine without network needs the file
    there.  ValueError, saying where the cache is, when they cannot be had."""
    try:
        source, _ = library_backbone(arch, pretrained=True)
    except Exception as err:  # no network, a missing cache entry, a model without pretrained weights
        raise ValueError(f"pretrained weights of {arch} could not be loaded ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:300]}); without network, put the file where "
                         f"{pretrained_cache(arch)}, or give a local file as `weights`") from None
    backbone.load_state_dict(source.state_dict())


def pretrained_cache(arch: str) -> str:
    """Where a library looks for its pretrained weights before it downloads them."""
    if arch.startswith("timm/"):
        from huggingface_hub import constants

        return f"the Hugging Face hub cache holds it ({constants.HF_HUB_CACHE}; HF_HOME or HF_HUB_CACHE move it)"
    import torch.hub

    return f"torch.hub keeps it ({torch.hub.get_dir()}/checkpoints; TORCH_HOME moves it)"


def first_mismatch(tensors: dict, expected: dict, keys=None) -> str | None:
    """The first key (sorted) whose tensor is missing, unexpected or of another shape, described for an error
    message; None when the file's tensors fit the architecture's state dict."""
    for key in keys if keys is not None else sorted(set(expected) | set(tensors)):
        if key not in tensors or key not in expected or tensors[key].shape != expected[key].shape:
            return (f"first mismatched key {key!r} ({tuple(tensors[key].shape) if key in tensors else 'missing'} in "
                    f"the file, {tuple(expected[key].shape) if key in expected else 'absent'} in the architecture)")
    return None


ACTIVATIONS = ("relu", "leaky_relu")
# The slope of leaky_relu's negative side: small enough that the network behaves much like its ReLU twin,
# large enough that no unit's gradient is ever exactly zero (LQF, Achille et al. 2021, swaps ReLU for it).
LEAKY_SLOPE = 0.1


def with_activation(backbone: nn.Module, activation: str) -> nn.Module:
    """The architecture's activation variant: `leaky_relu` replaces every ReLU and ReLU6 by a leaky ReLU.

    Still piecewise linear, but with no flat side, so the network's first-order Taylor expansion in its
    weights (what LQF fine-tunes) never loses the gradient of a unit that is off at the linearisation point.
    """
    if activation == "relu":
        return backbone
    for module in list(backbone.modules()):
        for name, child in module.named_children():
            if isinstance(child, (nn.ReLU, nn.ReLU6)):
                setattr(module, name, nn.LeakyReLU(LEAKY_SLOPE))
    return backbone


def build_backbone(arch: str, width: float, depth: float, activation: str = "relu",
                   blocks: dict | None = None) -> tuple[nn.Module, int]:
    """`blocks`: per-block options of architectures that take them (BLOCK_OPTIONS), None or empty for the
    architecture's own."""
    blocks = {k: v for k, v in (blocks or {}).items() if v is not None}
    unknown = sorted(set(blocks) - set(BLOCK_OPTIONS.get(arch, ())))
    if unknown:
        raise KeyError(f"{unknown[0]}: architecture {arch!r} has no per-block option {unknown[0]!r}"
                       f"{'; ' + ', '.join(BLOCK_OPTIONS[arch]) + ' only' if arch in BLOCK_OPTIONS else ''}")
    if activation not in ACTIVATIONS:
        raise KeyError(f"unknown activation {activation!r}; available: {', '.join(ACTIVATIONS)}")
    if activation != "relu" and (is_library_arch(arch) or arch not in ARCHITECTURES):
        raise KeyError(f"activation {activation!r}: a variant of hetero's own architectures "
                       f"({', '.join(sorted(ARCHITECTURES))}); {arch!r} keeps its own activations")
    if is_library_arch(arch):
        if (width, depth) != (1.0, 1.0):
            raise KeyError(f"architecture {arch!r} comes at its own width and depth: leave width and depth at 1.0 "
                           f"(got {width}, {depth}) and pick a smaller model of its family instead")
        return library_backbone(arch)
    if arch not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {arch!r}; registered: {', '.join(sorted(ARCHITECTURES))}, or "
                       f"timm/<name>, torchvision/<name>")
    backbone, channels = ARCHITECTURES[arch](width, depth, **blocks)
    return with_activation(backbone, activation), channels


class Embedder(nn.Module):
    """Backbone + pooling + projection + L2 normalisation, with the input normalisation inside."""

    def __init__(self, arch: str, width: float, depth: float, dim: int, input_size: int,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), activation: str = "relu", blocks: dict | None = None):
        super().__init__()
        self.arch, self.width, self.depth, self.dim, self.input_size = arch, width, depth, dim, input_size
        self.activation, self.blocks = activation, {k: v for k, v in (blocks or {}).items() if v is not None}
        self.backbone, channels = build_backbone(arch, width, depth, activation, blocks)
        self.project = nn.Linear(channels, dim, bias=False)
        self.bn = nn.BatchNorm1d(dim)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.adapter: nn.Linear | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / self.std
        x = self.backbone(x)
        if x.dim() == 4:  # a feature map (library backbones pool themselves)
            x = F.adaptive_avg_pool2d(x, 1)
        x = torch.flatten(x, 1)
        x = F.normalize(self.bn(self.project(x)), dim=1)
        if self.adapter is not None:  # compat: adapter, a fitted map into the cloud's space
            x = F.normalize(self.adapter(x), dim=1)
        return x


EXIT_HEADS = ("pooled", "grid")


class ExitHead(nn.Module):
    """An exit: pooled stage features -> projection -> BatchNorm -> unit vector of the family dimension.

    `pooled`: one global average.  `grid` (the feature reduction of Shallow-Deep Networks, Kaya et al., ICML
    2019): the feature map pooled to a grid of up to 4 x 4 cells, a learned mix of max and average pooling,
    so an early exit keeps where its features are, which a global average of shallow features loses.  The
    grid is the largest of 4, 3, 2 that divides the map's side (`size`), so every pooling window is whole and
    every converter exports it as a plain pooling op.
    """

    def __init__(self, channels: int, dim: int, kind: str = "pooled", size: int = 1):
        super().__init__()
        self.grid = next((g for g in (4, 3, 2) if size % g == 0), 1) if kind == "grid" else 1
        self.window = size // self.grid
        self.mix = nn.Parameter(torch.zeros(1)) if self.grid > 1 else None  # sigmoid(mix): the max pooling's share
        self.project = nn.Linear(channels * self.grid * self.grid, dim, bias=False)
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.mix is None:
            pooled = F.adaptive_avg_pool2d(features, 1)
        else:
            share = torch.sigmoid(self.mix)
            pooled = share * F.max_pool2d(features, self.window) + (1 - share) * F.avg_pool2d(features, self.window)
        return F.normalize(self.bn(self.project(torch.flatten(pooled, 1))), dim=1)


class MultiExitEmbedder(nn.Module):
    """One trunk of hetero's own architectures with an exit after each chosen stage (1-based stage indices).

    Every exit emits an embedding of the family dimension.  `forward` is the last exit (the embedding
    contract: the member as a plain embedder); `forward_exits` returns every exit's.  The anchors (unit
    vectors) and one temperature per exit give each exit a confidence from its embedding alone: the entropy
    of softmax(cos(embedding, anchors) / temperature).  They are buffers, so they ship inside every export.
    """

    def __init__(self, arch: str, width: float, depth: float, dim: int, input_size: int, exits: list[int],
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), anchors: int = 64, activation: str = "relu",
                 exit_head: str = "pooled", blocks: dict | None = None):
        super().__init__()
        self.arch, self.width, self.depth, self.dim, self.input_size = arch, width, depth, dim, input_size
        self.activation, self.exit_head = activation, exit_head
        self.blocks = {k: v for k, v in (blocks or {}).items() if v is not None}
        backbone, _ = build_backbone(arch, width, depth, activation, blocks)
        ends, widths = backbone.stage_ends, backbone.stage_widths
        self.exits = resolve_exits(exits, len(ends), arch)
        starts = [0] + [ends[stage - 1] for stage in self.exits[:-1]]
        self.segments = nn.ModuleList(nn.Sequential(*list(backbone)[start:ends[stage - 1]])
                                      for start, stage in zip(starts, self.exits))
        sizes, x = [], torch.zeros(1, 3, input_size, input_size)
        with torch.no_grad():
            for segment in self.segments:
                x = segment.eval()(x)
                sizes.append(x.shape[-1])
        self.segments.train()
        # the last exit is the member itself: pooled as a single-exit member is, whatever the earlier heads
        self.heads = nn.ModuleList(ExitHead(widths[stage - 1], dim, exit_head if k < len(self.exits) - 1 else "pooled",
                                            sizes[k]) for k, stage in enumerate(self.exits))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("anchors", F.normalize(torch.ones(anchors, dim), dim=1))
        self.register_buffer("temperatures", torch.ones(len(self.exits)))
        self.adapter = None  # compat: adapter does not apply to multi-exit members

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / self.std
        for segment in self.segments:
            x = segment(x)
        return self.heads[-1](x)

    def forward_exits(self, images: torch.Tensor) -> list[torch.Tensor]:
        x, out = (images - self.mean) / self.std, []
        for segment, head in zip(self.segments, self.heads):
            x = segment(x)
            out.append(head(x))
        return out

    def stage(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Segment `index` (0-based) on the previous segment's features (images for the first): (embedding,
        entropy, features for the next segment)."""
        if index == 0:
            x = (x - self.mean) / self.std
        x = self.segments[index](x)
        embedding = self.heads[index](x)
        return embedding, self.entropy(embedding, index), x

    def entropy(self, embedding: torch.Tensor, index: int) -> torch.Tensor:
        """Per row: entropy (nats) of the softmax over cosine similarities to the anchors at exit `index`."""
        log_p = F.log_softmax(embedding @ self.anchors.T / self.temperatures[index], dim=1)
        return -(log_p.exp() * log_p).sum(dim=1)


def resolve_exits(exits, stages: int, arch: str) -> list[int]:
    """Sorted 1-based stage indices with the last stage always an exit; `auto`: one exit per stage."""
    if exits == "auto":
        return list(range(1, stages + 1))
    bad = [e for e in exits if not isinstance(e, int) or not 1 <= e <= stages]
    if bad:
        raise ValueError(f"exits: stage {bad[0]!r} does not exist; architecture {arch!r} has stages 1-{stages} "
                         f"(or give `auto` for one exit per stage)")
    return sorted(set(exits) | {stages})


def add_adapter(model: Embedder, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> Embedder:
    """Give a member the linear map (then L2 normalisation) of compat: adapter, part of its exported graph."""
    model.adapter = nn.Linear(model.dim, model.dim, bias=True)
    with torch.no_grad():
        model.adapter.weight.copy_(weight if weight is not None else torch.eye(model.dim))
        model.adapter.bias.copy_(bias if bias is not None else torch.zeros(model.dim))
    return model


def resize_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a batch of float images to a member's input size (the one resize used everywhere)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: Embedder) -> int:
    """FLOPs of one image at the member's input size (torch's own counter; a multiply-add is 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, model.input_size, model.input_size))
    model.train(was_training)
    return int(counter.get_total_flops())


def build_member(member_cfg, dim: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> Embedder:
    """A trainable member from its config; a library backbone starts from `weights` or, `pretrained`, from its
    library's weights.  ValueError when those do not fit or cannot be had."""
    activation = getattr(member_cfg, "activation", "relu")
    blocks = member_blocks(member_cfg)
    if getattr(member_cfg, "exits", None) is not None:
        return MultiExitEmbedder(member_cfg.arch, member_cfg.width, member_cfg.depth, dim, member_cfg.input_size,
                                 member_cfg.exits, mean, std, activation=activation, exit_head=member_cfg.exit_head,
                                 blocks=blocks)
    model = Embedder(member_cfg.arch, member_cfg.width, member_cfg.depth, dim, member_cfg.input_size, mean, std,
                     activation, blocks)
    if getattr(member_cfg, "weights", None):
        load_backbone_weights(model.backbone, member_cfg.weights, member_cfg.arch)
    elif getattr(member_cfg, "pretrained", False):
        load_pretrained(model.backbone, member_cfg.arch)
    return model


def member_blocks(record) -> dict:
    """The per-block options (BLOCK_OPTIONS) a member config or manifest record gives, None ones left out."""
    names = {name for options in BLOCK_OPTIONS.values() for name in options}
    return {name: getattr(record, name) for name in sorted(names) if getattr(record, name, None) is not None}


def exit_flops(model: MultiExitEmbedder) -> list[int]:
    """Cumulative FLOPs of one image up to and including each exit: the trunk so far plus that exit's head and
    entropy (what a device spends to decide whether to stop there; earlier heads are counted too, as a device
    that went on past them ran them)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    x = (torch.zeros(1, 3, model.input_size, model.input_size) - model.mean) / model.std
    spent, out = 0, []
    with torch.no_grad():
        for index, (segment, head) in enumerate(zip(model.segments, model.heads)):
            trunk, exit_ = FlopCounterMode(display=False), FlopCounterMode(display=False)
            with trunk:
                x = segment(x)
            with exit_:
                model.entropy(head(x), index)
            spent += int(trunk.get_total_flops())
            out.append(spent + int(exit_.get_total_flops()))
            spent += int(exit_.get_total_flops())
    model.train(was_training)
    return out


@torch.no_grad()
def embed_images(model: Embedder, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """A torch member's embeddings of float images in [0, 1] (resized to its input size), in eval mode."""
    model.eval()
    chunks = [model(resize_to(images[i:i + batch_size], model.input_size)) for i in range(0, len(images), batch_size)]
    return torch.cat(chunks)


@torch.no_grad()
def exit_embeddings(model: MultiExitEmbedder, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Every exit's embeddings of float images in [0, 1]: exits x images x dim."""
    model.eval()
    chunks = [torch.stack(model.forward_exits(resize_to(images[i:i + batch_size], model.input_size)))
              for i in range(0, len(images), batch_size)]
    return torch.cat(chunks, dim=1)


@torch.no_grad()
def exit_entropies(model: MultiExitEmbedder, embeddings: torch.Tensor) -> torch.Tensor:
    """exits x images: each exit's entropy of its own embeddings."""
    return torch.stack([model.entropy(embeddings[k], k) for k in range(len(embeddings))])
