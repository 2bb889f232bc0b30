"""External clouds: an embedding model the user already has, frozen, as a family's cloud member.

The model is a file: ONNX (run in onnxruntime), or a timm / torchvision architecture with a safetensors
weights file.  :class:`ExternalCloud` wraps either with the embedding contract (RGB floats in [0, 1] at the
input size in, an L2-normalised float32 vector out): it applies the configured preprocessing (mean/std,
colour order) before the model and the L2 normalisation after it.  It is never trained.

TorchScript (.pt) and ``torch.export`` (.pt2) files load through pickle, which runs whatever code the file
carries.  hetero opens one only when its member says ``trust_model_file: true``, and then once: it converts
the file to ONNX (:func:`convert_trusted`, parity checked) and the family keeps only the ONNX, so whoever
opens the family later runs nothing of the file's.

The space id of an external cloud is a fingerprint of the model (its bytes; for weights, the tensors), the
preprocessing and the output dimension, and nothing else: a gallery embedded with that file, and every family
trained against it, share it; another file or other preprocessing gives another id.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hetero.config import MODEL_FILE_KINDS, PICKLED_KINDS, untrusted_message
from hetero.errors import ConfigError, reason

# The converted graph must compute what the file computes: cosine of the raw outputs on probe images.
CONVERSION_MIN_COSINE = 0.99999
RESIZE_RULE = "bicubic to the load size, then bilinear (antialiased) to input_size"
# Metadata key hetero writes into its own exported files (export/common.py writes the same key).
HETERO_METADATA = "hetero"


@dataclass(frozen=True)
class Preprocessing:
    """What the wrapper does to [0, 1] RGB images before the model sees them."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    colour_order: str = "RGB"
    layout: str = "NCHW"
    resize: str = RESIZE_RULE


def model_format(path: Path, arch: str | None) -> str:
    kind = MODEL_FILE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"{path}: cannot tell the model format from suffix {path.suffix!r}; known: "
                          f"{', '.join(f'{s} ({k})' for s, k in MODEL_FILE_KINDS.items())}")
    if kind == "weights" and not arch:
        raise ConfigError(f"{path}: a weights file needs the architecture it belongs to (arch: timm/<name> or "
                          f"torchvision/<name>)")
    return kind


def file_metadata(path: Path, kind: str) -> dict:
    """Preprocessing a model file states about itself (hetero's own exports state all of it)."""
    if kind != "onnx":
        return {}
    proto = _read_onnx(path, load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    found: dict = {}
    if HETERO_METADATA in props:
        try:
            meta = json.loads(props[HETERO_METADATA])
        except ValueError:
            meta = {}
        if isinstance(meta, dict) and "input_size" in meta:
            # hetero's files carry their normalisation inside the graph: they take [0, 1] RGB as they are.
            found = {"input_size": int(meta["input_size"]), "mean": [0.0] * 3, "std": [1.0] * 3,
                     "colour_order": meta.get("preprocessing", {}).get("colour_order", "RGB")}
    for key in ("mean", "std"):  # other tools' plain metadata, e.g. "mean": "[0.485, 0.456, 0.406]"
        if key in props and key not in found:
            try:
                found[key] = [float(v) for v in json.loads(props[key])]
            except (ValueError, TypeError):
                pass
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    if "input_size" not in found and len(shape) == 4:
        sides = [s for s in (shape[1:3] if shape[-1] == 3 else shape[2:4]) if s > 0]
        if len(sides) == 2 and sides[0] == sides[1]:
            found["input_size"] = sides[0]
    return found


def _read_onnx(path: Path, load_external_data: bool = True):
    """The ONNX graph of a file that has one input, or ConfigError saying why the file is not such a graph."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=load_external_data)
    except Exception as err:  # protobuf's DecodeError, a missing external data file, ...
        raise ConfigError(f"{path}: cannot be loaded as onnx ({reason(err)})") from None
    initializers = {t.name for t in proto.graph.initializer}
    if not [i for i in proto.graph.input if i.name not in initializers]:
        raise ConfigError(f"{path}: the ONNX graph has no input; an embedding model takes one batch of images")
    if not proto.graph.output:
        raise ConfigError(f"{path}: the ONNX graph has no output; an embedding model returns one vector per image")
    return proto


def fingerprint(path: Path, kind: str) -> str:
    """sha256 of the model: the file's bytes, or for weights the tensors (whatever their order in the file).

    ONNX metadata is left out, so stamping a file with descriptive metadata keeps its id.
    """
    if kind == "weights":
        from safetensors.torch import load_file

        from hetero.files import tensors_digest

        return tensors_digest(load_file(str(path)))
    if kind == "onnx":
        proto = _read_onnx(path)
        del proto.metadata_props[:]
        return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def external_space_id(model_fingerprint: str, preprocessing: Preprocessing, dim: int) -> str:
    key = json.dumps({"model": model_fingerprint, "preprocessing": asdict(preprocessing), "dim": dim},
                     sort_keys=True)
    return "hs-" + hashlib.sha256(key.encode()).hexdigest()[:16]


class _OnnxModel:
    def __init__(self, path: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        shape = self.session.get_inputs()[0].shape
        self.nhwc = len(shape) == 4 and shape[-1] == 3 and shape[1] != 3
        batch = shape[0] if shape else None
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 2, 3, 1) if self.nhwc else images
        x = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        if self.fixed_batch is None or len(x) == self.fixed_batch:
            return torch.from_numpy(self.session.run(None, {self.input: x})[0])
        outputs = []  # a file exported at a fixed batch: feed it that batch, padding the last one
        for begin in range(0, len(x), self.fixed_batch):
            chunk = x[begin:begin + self.fixed_batch]
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], self.fixed_batch - len(chunk), 0)])
            outputs.append(self.session.run(None, {self.input: padded})[0][:len(chunk)])
        return torch.from_numpy(np.concatenate(outputs))


def _load_model(path: Path, kind: str, arch: str | None):
    """A callable (float tensor -> tensor) for the file, or ConfigError saying why it does not load."""
    if kind in PICKLED_KINDS:  # only convert_trusted() may open these
        raise ConfigError(untrusted_message(path, kind))
    try:
        if kind == "onnx":
            _read_onnx(path)
            return _OnnxModel(path)
        return _weights_model(path, arch)
    except ConfigError:
        raise
    except Exception as err:  # each loader has its own exceptions; all mean the same to the user
        raise ConfigError(f"{path}: cannot be loaded as {kind} ({reason(err)})") from None


def _weights_model(path: Path, arch: str) -> nn.Module:
    """A timm/torchvision model whose classifier size (or absence) is read from the weights file."""
    from safetensors.torch import load_file

    from hetero.models import TORCHVISION_HEADS, first_mismatch, is_library_arch

    if not is_library_arch(arch):
        raise ConfigError(f"{path}: a weights file needs arch timm/<name> or torchvision/<name>, got {arch!r}")
    tensors = load_file(str(path))
    prefix, name = arch.split("/", 1)
    if prefix == "timm":
        import timm

        head = timm.create_model(name, pretrained=False).pretrained_cfg.get("classifier", "fc")
        classes = tensors[f"{head}.weight"].shape[0] if f"{head}.weight" in tensors else 0
        model = timm.create_model(name, pretrained=False, num_classes=classes)
    else:
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        head = next((h for h in TORCHVISION_HEADS if isinstance(getattr(model, h, None), nn.Module)), None)
        last = [k for k in tensors if head and k.startswith(f"{head}.") and k.endswith(".weight")]
        if last:
            classes = tensors[sorted(last)[-1]].shape[0]
            model = torchvision.models.get_model(name, weights=None, num_classes=classes)
        elif head:
            setattr(model, head, nn.Identity())
    expected = model.state_dict()
    mismatch = first_mismatch(tensors, expected)
    if mismatch:
        raise ConfigError(f"{path}: does not fit {arch}: {mismatch}")
    model.load_state_dict(tensors)
    return model.eval()


class _InferenceOnly(nn.Module):
    """A loaded model that stays in inference mode: a torch.export program refuses train() and eval() alike."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def train(self, mode: bool = True):
        self.training = False
        return self

    def forward(self, images: torch.Tensor):
        return self.model(images)


def _load_trusted(path: Path, kind: str) -> nn.Module:
    """The model in a TorchScript or torch.export file: this unpickles, so only on the user's word."""
    import logging

    # torch logs a full traceback of its own before raising on a file it cannot read: one paragraph is enough.
    quiet = [logging.getLogger(name) for name in ("torch.export", "torch._export", "torch.jit")]
    levels = [logger.level for logger in quiet]
    try:
        for logger in quiet:
            logger.setLevel(logging.CRITICAL)
        if kind == "torchscript":  # the ONNX exporter takes a ScriptModule as it is
            return torch.jit.load(str(path), map_location="cpu").eval()
        program = torch.export.load(str(path)).module()
        for parameter in program.parameters():  # frozen: traced as constants of the graph, not as trainables
            parameter.requires_grad_(False)
        return _InferenceOnly(program)
    except Exception as err:  # each loader has its own exceptions; all mean the same to the user
        raise ConfigError(f"{path}: cannot be loaded as {kind} ({reason(err)})") from None
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def convert_trusted(path: Path, kind: str, input_size: int, target: Path) -> Path:
    """Convert a trusted TorchScript / torch.export file to ONNX at `target`, checked to compute the same.

    The ONNX graph takes what the file takes (the wrapper's preprocessing stays outside it) with a dynamic
    batch; its raw outputs must match the file's on probe images, or the conversion is refused.
    """
    model = _load_trusted(path, kind)
    probe = torch.rand(4, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            expected = model(probe)
        if not isinstance(expected, torch.Tensor):
            raise ConfigError(f"{path}: returns {type(expected).__name__}, not one embedding tensor; an embedding "
                              f"model returns one vector per image")
        torch.onnx.export(model, (probe,), str(target), input_names=["images"], output_names=["embedding"],
                          dynamic_axes={"images": {0: "batch"}, "embedding": {0: "batch"}}, dynamo=False,
                          opset_version=17)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"{path}: could not be converted to ONNX ({reason(err)}); export the model to ONNX "
                          f"yourself and give the .onnx file") from None
    try:
        converted = _OnnxModel(target)(probe)
    except Exception as err:
        raise ConfigError(f"{path}: its ONNX conversion does not run in onnxruntime ({reason(err)}); export the "
                          f"model to ONNX yourself") from None
    cosine = F.cosine_similarity(expected.float().flatten(1), converted.float().flatten(1), dim=1).min().item()
    if not cosine >= CONVERSION_MIN_COSINE:
        raise ConfigError(f"{path}: its ONNX conversion computes something else (cosine {cosine:.6f} to the file's "
                          f"outputs on probe images, {CONVERSION_MIN_COSINE} needed); export the model to ONNX "
                          f"yourself and give the .onnx file")
    return target


class ExternalCloud(nn.Module):
    """A frozen external model with the embedding contract; `dim` is read from the model itself."""

    def __init__(self, path: str | Path, kind: str, preprocessing: Preprocessing, arch: str | None = None):
        super().__init__()
        self.path, self.kind, self.arch, self.preprocessing = Path(path), kind, arch, preprocessing
        self.converted_from: tuple[Path, str] | None = None  # (file, kind) this ONNX graph was converted from
        self.input_size = preprocessing.input_size
        self.model = _load_model(self.path, kind, arch)
        if isinstance(self.model, nn.Module):
            for parameter in self.model.parameters():  # ScriptModules have no requires_grad_()
                parameter.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.dim = self._output_dim()

    def _output_dim(self) -> int:
        probe = torch.rand(2, 3, self.input_size, self.input_size, generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                out = self._raw(probe)
        except Exception as err:
            raise ConfigError(f"{self.path}: does not run on a batch of 2 RGB images of {self.input_size} px "
                              f"({reason(err)}); check input_size and "
                              f"that the model takes a dynamic batch") from None
        if isinstance(out, (tuple, list)) or not isinstance(out, torch.Tensor):
            raise ConfigError(f"{self.path}: returns {type(out).__name__}, not one embedding tensor; an embedding "
                              f"model returns one vector per image")
        shape = tuple(out.shape)
        if len(shape) == 4 and shape[2:] == (1, 1):
            shape = shape[:2]
        if len(shape) != 2 or shape[0] != 2:
            raise ConfigError(f"{self.path}: returns shape {tuple(out.shape)} for 2 images; an embedding model "
                              f"returns one vector per image (batch x dim)")
        return int(shape[1])

    def _raw(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) / self.std
        if self.preprocessing.colour_order == "BGR":
            x = x.flip(1)
        return self.model(x)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self._raw(images.float()).float()
        return F.normalize(out.flatten(1), dim=1)

    def train(self, mode: bool = True):
        # Frozen, always in inference mode: a user's batch statistics never change.
        self.training = False
        if isinstance(self.model, nn.Module):
            self.model.eval()
        return self


def open_external(path: str | Path, arch: str | None, input_size: int | None, mean, std, colour_order: str,
                  trusted: bool = False, member: str | None = None) -> tuple[ExternalCloud, str]:
    """(the wrapped model, its space fingerprint) from a member's settings and the file's own metadata.

    A TorchScript / torch.export file is refused unless `trusted`; then the model wraps its ONNX conversion
    (in a temporary folder that lives as long as the model) and `model.converted_from` names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: external model file not found")
    kind = model_format(path, arch)
    if kind in PICKLED_KINDS and not trusted:
        raise ConfigError(untrusted_message(path, kind, member))
    stated = file_metadata(path, kind)
    size = input_size or stated.get("input_size")
    if not size:
        raise ConfigError(f"{path}: the file does not state its input size; give input_size on the member")
    preprocessing = Preprocessing(int(size), tuple(mean or stated.get("mean") or (0.0, 0.0, 0.0)),
                                  tuple(std or stated.get("std") or (1.0, 1.0, 1.0)),
                                  colour_order or stated.get("colour_order", "RGB"))
    if kind not in PICKLED_KINDS:
        return ExternalCloud(path, kind, preprocessing, arch), fingerprint(path, kind)
    import tempfile

    folder = tempfile.TemporaryDirectory(prefix="hetero-converted-")
    converted = convert_trusted(path, kind, preprocessing.input_size, Path(folder.name) / f"{path.stem}.onnx")
    try:
        model = ExternalCloud(converted, "onnx", preprocessing)
    except ConfigError as err:  # name the user's file, not the temporary conversion
        raise ConfigError(str(err).replace(str(converted), f"{path} (converted to ONNX)")) from None
    model.converted_from, model.converted_folder = (path, kind), folder  # the folder lives as long as the model
    # The id is the original file's: the same file gives the same space whether or not it was converted.
    return model, fingerprint(path, kind)


def count_onnx_flops(path: Path, input_size: int) -> int:
    """FLOPs of one image through an ONNX graph: Conv, Gemm and MatMul (a multiply-add is 2 FLOPs)."""
    from onnx import shape_inference

    proto = _read_onnx(path)
    graph = proto.graph
    first = graph.input[0].type.tensor_type.shape.dim
    nhwc = len(first) == 4 and first[-1].dim_value == 3 and first[1].dim_value != 3
    sizes = [1, input_size, input_size, 3] if nhwc else [1, 3, input_size, input_size]
    for dim, value in zip(first, sizes):
        dim.ClearField("dim_param")
        dim.dim_value = value
    inferred = shape_inference.infer_shapes(proto).graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.value_info) + list(inferred.output) + list(inferred.input)}
    shapes.update({t.name: list(t.dims) for t in graph.initializer})
    total = 0
    for node in graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.output[0] in shapes:
            weight, out = shapes.get(node.input[1], []), shapes[node.output[0]]
            if len(weight) == 4 and len(out) == 4:
                total += 2 * int(np.prod(out[1:])) * int(np.prod(weight[1:]))
        elif node.op_type in ("Gemm", "MatMul") and shapes.get(node.input[0]) and node.output[0] in shapes:
            inner = shapes[node.input[0]][-1]  # A is rows x K in both
            total += 2 * int(np.prod(shapes[node.output[0]][1:] or [0])) * int(inner)
    return total
