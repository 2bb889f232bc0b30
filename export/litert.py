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

from hetero.export.common import (METADATA_KEY, ExportError, RuntimeAdapter, example_input, graph_for,
                                  keeps_parity, need_calibration, parity, split_calibration)

SIGNATURE = "serving_default"
# Ops of the backbone that static int8 quantises; the input normalisation and the embedding head
# (FULLY_CONNECTED, batch norm, L2 normalisation) stay float, as in the ONNX exporter.
STATIC_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "MEAN", "PAD", "MAX_POOL_2D", "AVERAGE_POOL_2D")
# Float conversions by (weights, size, layout, batch): the profiles of one member share one conversion.
_FLOAT_CACHE: LRUCache = LRUCache(maxsize=8)


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
    import litert_torch

    state = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        state.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    key = (state.hexdigest(), size, profile.layout, profile.batch)
    if key not in _FLOAT_CACHE:
        converted = litert_torch.convert(graph_for(model, profile), (example_input(profile, size),))
        _FLOAT_CACHE[key] = bytes(converted.model_content())
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


def _weight_only(float_model: bytes):
    from ai_edge_quantizer import recipe

    return _quantize(float_model, recipe.weight_only_wi8_afp32()), {
        "scheme": "int8-weights", "weights": "int8 per-channel (dequantised before each op)",
        "activations": "float32", "io": "float32"}


def _dynamic(float_model: bytes):
    from ai_edge_quantizer import recipe

    return _quantize(float_model, recipe.dynamic_wi8_afp32()), {
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
