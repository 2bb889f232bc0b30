"""LiteRT (.tflite) export with litert-torch, quantisation with ai-edge-quantizer, and the LiteRT adapter.

One float conversion per member and input shape (it takes 5-25 s; the fp16/int8 variants are derived from
it in well under a second, so it is cached for the process).  Precisions:

- fp32: the converted float model;
- fp16: float16 weights (float casting), float32 compute and I/O;
- int8-weights: int8 weights (per channel), dequantised to float before each op;
- int8-dynamic: int8 weights, activations quantised at run time (dynamic range);
- int8: static int8 backbone (Conv/Add/Pool, activations calibrated on real training images) with float32
  input and output and a float embedding head; when its cosine to the torch member on the calibration
  images is below the profile's tolerance, dynamic-range int8, then int8 weights only (the scheme used and
  why are recorded in the metadata).  Measured on the quickstart family: ai-edge-quantizer's static int8
  reaches only min cosine 0.90-0.96 where onnxruntime's QDQ reaches 0.998 on the same members.

Metadata lives in the flatbuffer's own `metadata` table under the key "hetero" (JSON).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from cachetools import LRUCache

from hetero.export.common import (FLOAT32_PARTS, METADATA_KEY, ExitChain, ExportError, RuntimeAdapter,
                                  example_input, graph_for, keeps_parity, need_calibration, parity, split_calibration,
                                  write_exit_chain)

SIGNATURE = "serving_default"
# Ops of the backbone that static int8 quantises; the input normalisation and the embedding head
# (FULLY_CONNECTED, batch norm, L2 normalisation) stay float, as in the ONNX exporter.
STATIC_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "MEAN", "PAD", "MAX_POOL_2D", "AVERAGE_POOL_2D")
# Float conversions by (weights, module, input shape): the profiles of one member share one conversion (a
# multi-exit member's chain is one conversion per stage plus the all-exits graph).
_FLOAT_CACHE: LRUCache = LRUCache(maxsize=24)
# Op scopes (output tensor names, which litert-torch makes of module paths: the trunk's segments are
# nn.Sequential items of a ModuleList, Sequential_<k>/; the exit heads ExitHead_<k>; the entropy sits in the
# stage module itself) of a chain's int8 weights, per INT8_SCOPES; {last}: the last segment's index.
CHAIN_INT8_OPS = {"everywhere": ".*", "trunk": r"^(?!.*ExitHead).*Sequential_",
                  "last segment": r"^(?!.*ExitHead).*Sequential_{last}/"}



def export_tflite(model: torch.nn.Module, path: Path, profile, metadata: dict, calibration=None,
                  accept=None) -> dict:
    """Write `model` as a .tflite file at `path` with its metadata embedded; return what was done.

    `accept(candidate file) -> None | why not` says whether a quantised candidate also holds on the runtimes
    the profile declares (the export stage checks the final file on them again).
    """
    if profile.batch == 0:
        raise ExportError(f"profile {profile.name!r}: LiteRT needs a fixed batch size (litert-torch cannot "
                          f"export a dynamic batch); set batch: 1 (or another fixed size) in the profile")
    float_model = _float_tflite(model, profile, metadata["input_size"])
    precision = profile.precision
    if precision == "fp32":
        data, quantization = float_model, {"scheme": "none"}
    elif precision == "fp16":
        data, quantization = _fp16(float_model)
    elif precision == "int8-weights":
        data, quantization = _weight_only(float_model)
    elif precision == "int8-dynamic":
        data, quantization = _dynamic(float_model)
    else:
        data, quantization = _int8(model, float_model, profile, metadata, need_calibration(calibration, profile),
                                   Path(path), accept)
    Path(path).write_bytes(with_metadata(data, {**metadata, "quantization": quantization}))
    return {"quantization": quantization}


def _float_tflite(model: torch.nn.Module, profile, size: int) -> bytes:
    return _converted(graph_for(model, profile), example_input(profile, size))


def _converted(module: torch.nn.Module, example: torch.Tensor) -> bytes:
    """The float .tflite of `module` traced on `example` (cached for the process)."""
    import litert_torch

    state = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        state.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    kind, inner = [], module
    while inner is not None:  # the wrappers and what they wrap, with a chain stage's index
        kind.append(f"{type(inner).__name__}{getattr(inner, 'index', '')}")
        inner = getattr(inner, "model", None)
    key = (state.hexdigest(), "/".join(kind), tuple(example.shape))
    if key not in _FLOAT_CACHE:
        _FLOAT_CACHE[key] = bytes(litert_torch.convert(module.eval(), (example,)).model_content())
    return _FLOAT_CACHE[key]


def _quantize(float_model: bytes, recipe, calibration_data=None) -> bytes:
    from ai_edge_quantizer import quantizer

    q = quantizer.Quantizer(bytearray(float_model), recipe)
    result = q.calibrate(calibration_data) if calibration_data is not None else None
    return bytes(q.quantize(result).quantized_model)


def _fp16(float_model: bytes):
    from ai_edge_quantizer import qtyping, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    manager = recipe_manager.RecipeManager()
    manager.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                                   num_bits=16, algorithm_key=AlgorithmName.FLOAT_CASTING)
    return _quantize(float_model, manager.get_quantization_recipe()), {
        "scheme": "fp16", "weights": "float16", "activations": "float32", "io": "float32"}


def _weight_only(float_model: bytes, scope: str = ".*"):
    """int8 weights of the ops whose output tensor name matches `scope` (every op by default)."""
    from ai_edge_quantizer import qtyping, recipe_manager

    manager = recipe_manager.RecipeManager()
    manager.add_weight_only_config(regex=scope, operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=8)
    return _quantize(float_model, manager.get_quantization_recipe()), {
        "scheme": "int8-weights", "weights": "int8 per-channel (dequantised before each op)",
        "activations": "float32", "io": "float32"}


def _dynamic(float_model: bytes, scope: str = ".*"):
    from ai_edge_quantizer import qtyping, recipe_manager

    manager = recipe_manager.RecipeManager()
    manager.add_dynamic_config(regex=scope, operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=8)
    return _quantize(float_model, manager.get_quantization_recipe()), {
        "scheme": "int8-dynamic", "weights": "int8 per-channel",
        "activations": "int8, quantised at run time per batch", "io": "float32"}


def _static(float_model: bytes, calibration: torch.Tensor, profile):
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import qtyping, recipe_manager

    present = {op["op_name"] for op in Interpreter(model_content=float_model)._get_ops_details()}
    ops = [op for op in STATIC_OPS if op in present and op in qtyping.TFLOperationName.__members__]
    manager = recipe_manager.RecipeManager()
    for op in ops:
        manager.add_static_config(regex=".*", operation_name=qtyping.TFLOperationName[op],
                                  activation_num_bits=8, weight_num_bits=8)
    input_name = Interpreter(model_content=float_model).get_signature_list()[SIGNATURE]["inputs"][0]
    images = calibration.numpy().astype(np.float32)
    if profile.layout == "NHWC":
        images = images.transpose(0, 2, 3, 1)
    step = profile.batch
    samples = [{input_name: np.ascontiguousarray(images[i:i + step])}
               for i in range(0, len(images) - step + 1, step)]
    data = _quantize(float_model, manager.get_quantization_recipe(), {SIGNATURE: samples})
    return data, {"scheme": "static-int8", "weights": "int8 per-channel", "activations": "int8, MinMax calibration",
                  "io": "float32", "quantized_ops": ops, "calibration_images": len(samples) * step,
                  "calibration_source": "training split (no test classes)"}


def _int8(model, float_model: bytes, profile, metadata: dict, calibration: torch.Tensor, path: Path, accept=None):
    """The most integer scheme that keeps parity: static, else dynamic range, else weight-only int8.

    A scheme must keep parity here (ai-edge-litert) and, through `accept`, on every runtime the profile
    declares: dynamic-range int8 computes wrong vectors on tflite-runtime 2.14 (README, runtime matrix).
    """
    tolerance, tried = profile.tolerances.min_cosine, []
    fit, held = split_calibration(calibration)
    candidates = [lambda: _static(float_model, fit, profile), lambda: _dynamic(float_model),
                  lambda: _weight_only(float_model)]
    for number, make in enumerate(candidates, 1):
        data, quantization = make()
        check = parity(LiteRTAdapter(None, metadata, content=data), model, held)
        refused = None
        if keeps_parity(check, tolerance) and accept is not None:
            candidate = path.with_name(f"candidate-{number}.tflite")  # inside the export's private folder
            candidate.write_bytes(with_metadata(data, {**metadata, "quantization": quantization}))
            refused = accept(candidate)
        if keeps_parity(check, tolerance) and refused is None:
            break
        if refused is None and number == len(candidates):
            break  # nothing keeps parity here: keep the safest scheme and let verify report it
        if refused is not None and number == len(candidates):
            tried.append(f"{quantization['scheme']} {refused}")
            raise ExportError(f"profile {profile.name!r}: no int8 scheme holds on every runtime it declares "
                              f"({'; '.join(tried)})")
        tried.append(f"{quantization['scheme']} " + (refused or f"min cosine {check['min_cosine']:.4f} here"))
    quantization = {**quantization, "parity_check": check}
    if tried:
        quantization.update(fallback_from=tried[0].split()[0],
                            fallback_reason=f"{'; '.join(tried)}, on {check['images']} training images (not used "
                                            f"for calibration), against min cosine {1 - (1 - tolerance) / 2:g} "
                                            f"(half the margin of tolerance {tolerance})")
    return data, quantization


# ------------------------------------------------------------------------------- multi-exit members: chains
# The chain folder, chain.json and the runtime's loop are format-independent (hetero.export.common); here is
# only how one .tflite graph of a chain is written and run.

CHAIN_INT8_WHY = (
    "int8 weights dequantised before each op, float32 activations: a chain's exit decision compares each "
    "stage's entropy with a threshold, so the stage's activations stay float.  Dynamic-range int8 computes "
    "wrong vectors on tflite-runtime 2.14, which the Android profiles declare; static int8 would need "
    "activation ranges per segment and loses parity on this converter (ai-edge-quantizer: min cosine 0.90-0.96 "
    "on plain members)")


def export_exit_chain(model, folder: Path, profile, metadata: dict, int8_scope: str = "everywhere") -> dict:
    """A multi-exit member as a folder: stage<k>.tflite chained graphs, all_exits.tflite, and chain.json
    listing every file's sha256 (see `write_exit_chain`); each flatbuffer carries its metadata as plain
    members do.  Fixed batch (the profile's); the first stage and the all-exits graph take the profile's
    layout.  int8: int8 weights where `int8_scope` (one of INT8_SCOPES) says, the rest float32."""
    if profile.batch == 0:
        raise ExportError(f"profile {profile.name!r}: LiteRT needs a fixed batch size (litert-torch cannot "
                          f"export a dynamic batch); set batch: 1 (or another fixed size) in the profile")
    scope = CHAIN_INT8_OPS[int8_scope].format(last=len(model.exits) - 1)

    def write_graph(module, example, path: Path, inputs: list[str], outputs: list[str], graph_metadata: dict):
        data, quantization = _chain_precision(_converted(module, example), profile, int8_scope, scope)
        Path(path).write_bytes(with_metadata(data, {**graph_metadata, "quantization": quantization}))
        return quantization

    return write_exit_chain(model, folder, profile, metadata, ".tflite", write_graph)


def _chain_precision(float_model: bytes, profile, int8_scope: str, scope: str):
    if profile.precision == "fp16":
        return _fp16(float_model)
    if profile.precision not in ("int8", "int8-weights", "int8-dynamic"):
        return float_model, {"scheme": "none"}
    quantize = _dynamic if profile.precision == "int8-dynamic" else _weight_only
    data, quantization = quantize(float_model, scope)
    quantization["int8_scope"] = int8_scope
    if FLOAT32_PARTS[int8_scope]:
        quantization["float32_ops"] = FLOAT32_PARTS[int8_scope]
    if profile.precision != "int8-dynamic":
        quantization["why"] = CHAIN_INT8_WHY
    try:  # a scope that matched no op quantised nothing: say so rather than pass a float graph off as int8
        from ai_edge_litert.interpreter import Interpreter

        int8 = sum(t["dtype"] == np.int8 for t in Interpreter(model_content=data).get_tensor_details())
    except Exception:  # noqa: BLE001 -- only a count for the record
        int8 = None
    quantization["int8_tensors"] = int8
    return data, quantization


class _LiteRTGraph:
    """One graph of a chain in ai_edge_litert: its signature's outputs in the order they were exported."""

    def __init__(self, path: Path):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path))
        self.runner = self.interpreter.get_signature_runner(SIGNATURE)
        signature = self.interpreter.get_signature_list()[SIGNATURE]
        self.input, self.outputs = signature["inputs"][0], sorted(signature["outputs"], key=_output_order)
        self.batch = int(self.runner.get_input_details()[self.input]["shape"][0])

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        found = self.runner(**{self.input: x})
        return [found[name] for name in self.outputs]


def _output_order(name: str):
    """litert-torch names a signature's outputs output_0, output_1, ... in the order the module returns them."""
    tail = name.rsplit("_", 1)[-1]
    return (0, int(tail), name) if tail.isdigit() else (1, 0, name)


class LiteRTExitChain(ExitChain):
    """A multi-exit artifact in ai_edge_litert: every exit at once, or the chain run stage by stage with a
    rule; the graphs have a fixed batch (1 on the Android profiles), so images run one batch at a time."""

    name = "litert"

    def __init__(self, folder: Path):
        super().__init__(folder, read_tflite_metadata)

    def open_graph(self, path: Path) -> _LiteRTGraph:
        return _LiteRTGraph(path)


# ------------------------------------------------------------------------------------------------ metadata


def with_metadata(model: bytes, metadata: dict) -> bytes:
    """The flatbuffer with a `metadata` entry "hetero" holding the JSON (replacing an older one)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    tree = flatbuffer_utils.read_model_from_bytearray(bytearray(model))
    tree.metadata = [m for m in (tree.metadata or []) if m.name not in (METADATA_KEY, METADATA_KEY.encode())]
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(metadata).encode(), dtype=np.uint8)
    tree.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_KEY
    entry.buffer = len(tree.buffers) - 1
    tree.metadata.append(entry)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(tree))


def read_tflite_metadata(path_or_bytes) -> dict:
    from ai_edge_litert import schema_py_generated as schema

    data = Path(path_or_bytes).read_bytes() if isinstance(path_or_bytes, (str, Path)) else path_or_bytes
    model = schema.Model.GetRootAs(bytearray(data), 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name().decode() == METADATA_KEY:
            return json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    raise ExportError(f"{path_or_bytes if isinstance(path_or_bytes, (str, Path)) else 'model'}: no "
                      f"'{METADATA_KEY}' entry in the .tflite metadata")


# ---------------------------------------------------------------------------------------------- runtime


class LiteRTAdapter(RuntimeAdapter):
    """ai_edge_litert Interpreter; fixed batch (the file's input shape); quantised I/O handled if present."""

    name = "litert"

    def __init__(self, path: Path | None, metadata: dict | None = None, content: bytes | None = None):
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path) if path is not None else None
        self.metadata = metadata if metadata is not None else read_tflite_metadata(self.path)
        self.interpreter = (Interpreter(model_content=content) if content is not None
                            else Interpreter(model_path=str(self.path)))
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.batch = int(self.input["shape"][0])

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.input["index"], _to_dtype(batch, self.input))
        self.interpreter.invoke()
        out = self.interpreter.get_tensor(self.output["index"])
        scale, zero = self.output["quantization"]
        return (out.astype(np.float32) - zero) * scale if scale else out


def _to_dtype(batch: np.ndarray, detail: dict) -> np.ndarray:
    """Quantise float images for a full-integer input (scale and zero point from the file)."""
    if detail["dtype"] == np.float32:
        return batch
    scale, zero = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    return np.clip(np.round(batch / scale + zero), info.min, info.max).astype(detail["dtype"])
