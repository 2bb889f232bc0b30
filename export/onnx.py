"""ONNX export (torch.onnx; fp32, fp16, int8) and the onnxruntime adapter.

int8 picks the scheme that keeps parity: static QDQ int8 (per-channel weights, activations calibrated on
real training images) when its cosine to the torch member on other training images (not used for
calibration) keeps half the profile's cosine margin, otherwise int8 weights only (dequantised to float
before each Conv/Gemm/MatMul).  Per-channel static int8
keeps cosine ~0.997 on ReLU residual CNNs but not on hard-swish/squeeze-excite blocks; weight-only is the
safe fallback.  What was done is recorded in the file's metadata and in the manifest.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from hetero.export.common import (FLOAT32_PARTS, METADATA_KEY, ExitChain, ExportError, RuntimeAdapter,
                                  example_input, graph_for, keeps_parity, need_calibration, parity, split_calibration,
                                  write_exit_chain)


def export_onnx(model: torch.nn.Module, path: Path, profile, metadata: dict, calibration=None,
                accept=None) -> dict:
    """Write `model` as ONNX at `path` with metadata in metadata_props; return what was done.

    The file carries the oldest IR version its opsets allow, so older onnxruntime releases load it too (1.17
    reads IR 9 at most; the onnx package here writes newer).  `accept(candidate file) -> None | why not`
    says whether an int8 candidate holds on the runtimes the profile declares.
    """
    _export_float(model, path, profile, metadata["input_size"])
    if profile.precision == "fp16":
        quantization = _to_fp16(path)
    elif profile.precision == "int8":
        quantization = _quantize_int8(model, path, profile, metadata, need_calibration(calibration, profile), accept)
    else:
        quantization = {"scheme": "none"}
    _finish(path, {**metadata, "quantization": quantization})  # records the IR version in `quantization` too
    return {"quantization": quantization}


def _finish(path: Path, metadata: dict) -> int:
    """Lower the IR version to the oldest the opsets allow, record it in metadata["quantization"], and embed
    the metadata; return that version."""
    import onnx

    proto = onnx.load(str(path))
    # Quantizers stamp imports of domains no node uses (ai.onnx.ml 5, ...); older runtimes refuse unknown ones.
    used = {node.domain for node in proto.graph.node} | {""}
    kept = [o for o in proto.opset_import if o.domain in used or (o.domain == "ai.onnx" and "" in used)]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    defaults = [o for o in kept if o.domain in ("", "ai.onnx")]
    proto.ir_version = min(proto.ir_version, onnx.helper.find_min_ir_version_for(defaults))
    metadata["quantization"]["ir_version"] = int(proto.ir_version)
    del proto.metadata_props[:]
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(metadata))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return int(proto.ir_version)


def _export_float(model: torch.nn.Module, path: Path, profile, size: int) -> None:
    example = example_input(profile, size)
    dynamic = {"images": {0: "batch"}, "embedding": {0: "batch"}} if profile.batch == 0 else None
    # The legacy exporter is ~20x faster than dynamo here and gives the same graph for these CNNs; it also
    # keeps the weights inside the one .onnx file.
    torch.onnx.export(graph_for(model, profile), (example,), str(path), input_names=["images"],
                      output_names=["embedding"], dynamic_axes=dynamic, opset_version=profile.opset, dynamo=False)


def _to_fp16(path: Path) -> dict:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # keep_io_types: the device still feeds float32 images and gets a float32 embedding back.
    proto = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    _sort_nodes(proto.graph)  # the converter appends its input casts after the nodes that read them
    onnx.save(proto, str(path))
    return {"scheme": "fp16", "weights": "float16", "activations": "float16", "io": "float32"}


def _sort_nodes(graph) -> None:
    """Order nodes topologically (ONNX requires every input to be produced before it is read)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            raise ExportError("the fp16 graph has a cycle or an input nothing produces: "
                              f"{sorted(set(i for n in pending for i in n.input) - available)[:5]}")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if n not in ready]
    del graph.node[:]
    graph.node.extend(ordered)


# ------------------------------------------------------------------------------------------------- int8


def _quantize_int8(model, path: Path, profile, metadata: dict, calibration: torch.Tensor, accept=None) -> dict:
    """Static QDQ int8 when it keeps parity here and on every declared runtime, else int8 weights only."""
    float_path = path.with_name(path.stem + ".float.onnx")  # side files live in the atomic export folder
    path.replace(float_path)
    fit, held = split_calibration(calibration)
    static = _quantize_static(float_path, path, profile, fit)
    check = parity(OnnxRuntimeAdapter(path, metadata), model, held)
    margin = 1 - (1 - profile.tolerances.min_cosine) / 2
    if keeps_parity(check, profile.tolerances.min_cosine):
        _finish(path, {**metadata, "quantization": static})
        refused = accept(path) if accept is not None else None
        if refused is None:
            return {**static, "parity_check": check}
        reason = f"static int8 {refused}"
    else:
        reason = (f"static int8 min cosine {check['min_cosine']:.4f} on {check['images']} training images (not used "
                  f"for calibration) < {margin:g} (half the margin of tolerance {profile.tolerances.min_cosine})")
    weight_only = _quantize_weights(float_path, path)
    if accept is not None:
        _finish(path, {**metadata, "quantization": weight_only})
        refused = accept(path)
        if refused is not None:
            raise ExportError(f"profile {profile.name!r}: no int8 scheme holds on every runtime it declares "
                              f"({reason}; int8-weights {refused})")
    return {**weight_only, "parity_check": parity(OnnxRuntimeAdapter(path, metadata), model, held),
            "fallback_from": static["scheme"], "fallback_reason": reason}


class _Batches:
    """onnxruntime CalibrationDataReader over calibration images in the profile's layout and batch."""

    def __init__(self, images: torch.Tensor, profile):
        arrays = images.numpy().astype(np.float32)
        if profile.layout == "NHWC":
            arrays = np.ascontiguousarray(arrays.transpose(0, 2, 3, 1))
        step = profile.batch or 32
        chunks = [arrays[i:i + step] for i in range(0, len(arrays), step)]
        if profile.batch:  # a fixed-batch graph only takes whole batches
            chunks = [c for c in chunks if len(c) == step]
        self.batches = iter([{"images": chunk} for chunk in chunks])

    def get_next(self):
        return next(self.batches, None)

    def rewind(self):  # some onnxruntime versions call it
        pass


def _quantize_static(source: Path, target: Path, profile, calibration: torch.Tensor) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = source.with_name(source.stem + ".pre.onnx")
    # Symbolic shape inference crashes on the Expand that F.normalize produces; the ONNX one is enough.
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(target), _Batches(calibration, profile), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    # The embedding head (BatchNorm1d + L2 normalisation) stays float: its range is tiny and
                    # quantising it costs parity for no speed.
                    op_types_to_quantize=["Conv", "Add", "Relu", "GlobalAveragePool", "MaxPool"],
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    return {"scheme": "static-int8-qdq", "weights": "int8 per-channel symmetric",
            "activations": "int8 per-tensor asymmetric, MinMax calibration", "io": "float32",
            "calibration_images": len(calibration), "calibration_source": "training split (no test classes)",
            "quantized_ops": ["Conv", "Add", "Relu", "GlobalAveragePool", "MaxPool"]}


def _quantize_weights(source: Path, target: Path, chosen=None) -> dict:
    """int8 weights (per output channel, symmetric) dequantised in-graph; activations stay float32.
    `chosen(node)`: whether to quantise that node's weight (default: every Conv/Gemm/MatMul)."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(source))
    graph = proto.graph
    initializers = {i.name: i for i in graph.initializer}
    dequantize, quantized = [], []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or (chosen and not chosen(node)):
            continue
        weight = initializers.pop(node.input[1], None)  # popped: a weight two nodes share is quantised once
        if weight is None or weight.data_type != onnx.TensorProto.FLOAT or len(weight.dims) < 2:
            continue
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        axis = 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and trans_b) else 1
        values = numpy_helper.to_array(weight)
        reduce = tuple(d for d in range(values.ndim) if d != axis)
        scale = np.maximum(np.abs(values).max(axis=reduce), 1e-12) / 127.0
        shape = [1] * values.ndim
        shape[axis] = -1
        q = np.clip(np.round(values / scale.reshape(shape)), -127, 127).astype(np.int8)
        name = weight.name
        graph.initializer.remove(weight)
        graph.initializer.extend([numpy_helper.from_array(q, name + "_q"),
                                  numpy_helper.from_array(scale.astype(np.float32), name + "_scale"),
                                  numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), name + "_zero")])
        dequantize.append(helper.make_node("DequantizeLinear", [name + "_q", name + "_scale", name + "_zero"],
                                           [name], name=name + "_dequantize", axis=axis))
        quantized.append(node.op_type)
    if not quantized and chosen is None:
        raise ExportError(f"{source.name}: found no Conv/Gemm/MatMul weights to quantise")
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(dequantize + nodes)  # the dequantised weights feed the first nodes that use them
    onnx.save(proto, str(target))
    return {"scheme": "int8-weights", "weights": "int8 per-channel symmetric (dequantised in-graph)",
            "activations": "float32", "io": "float32",
            "quantized_ops": sorted(set(quantized)), "quantized_tensors": len(quantized)}  # 0: `chosen` took none


# ---------------------------------------------------------------------------------------------- runtime


def read_onnx_metadata(path: Path) -> dict:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise ExportError(f"{path}: no '{METADATA_KEY}' entry in the ONNX metadata_props")
    return json.loads(props[METADATA_KEY])


class OnnxRuntimeAdapter(RuntimeAdapter):
    name = "onnxruntime"

    def __init__(self, path: Path, metadata: dict | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.metadata = metadata if metadata is not None else read_onnx_metadata(self.path)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        shape = self.input.shape[0]
        self.batch = shape if isinstance(shape, int) else 0

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input.name: batch})[0]


# ------------------------------------------------------------------------------- multi-exit members: chains
# The chain folder, chain.json and the runtime's loop are format-independent (hetero.export.common); here is
# only how one ONNX graph of a chain is written and run.


def export_exit_chain(model, folder: Path, profile, metadata: dict, int8_scope: str = "everywhere") -> dict:
    """A multi-exit member as a folder: stage<k>.onnx chained graphs, all_exits.onnx, and chain.json listing
    every file's sha256 (see `write_exit_chain`).  `int8_scope` (int8): which weights are int8, one of
    INT8_SCOPES; the rest stays float32."""
    last = len(model.exits) - 1
    def write_graph(module, example, path: Path, inputs: list[str], outputs: list[str], graph_metadata: dict):
        dynamic = {name: {0: "batch"} for name in inputs + outputs} if profile.batch == 0 else None
        torch.onnx.export(module.eval(), (example,), str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic, opset_version=profile.opset, dynamo=False)
        quantization = _lower_precision(path, profile, int8_scope, last)
        _finish(path, {**graph_metadata, "quantization": quantization})
        return quantization

    return write_exit_chain(model, folder, profile, metadata, ".onnx", write_graph)


def _lower_precision(path: Path, profile, int8_scope: str = "everywhere", last: int = 0) -> dict:
    """fp16 as for plain members; int8 as int8 weights (dequantised in-graph): static int8 would need
    activation ranges per segment, which the chain's parity gate has not been measured with.  The exit
    decision compares entropies with thresholds, so it is the first to move: `int8_scope` "trunk" keeps the
    heads and the entropy (every node outside the trunk's segments) in float32, "last segment" everything but
    the last segment (`last`: its index).  At every scope the int8 weights are convolutions': a dequantised
    MatMul (an exit head's projection, the entropy's anchors) runs differently on the onnxruntime versions
    the profiles declare (the test suite's chain with grid heads: its exits differed between 1.17.3 and 1.32,
    and were identical with the MatMuls float)."""
    if profile.precision == "fp16":
        return _to_fp16(path)
    if profile.precision != "int8":
        return {"scheme": "none"}
    chosen = {"everywhere": lambda node: node.op_type == "Conv", "trunk": lambda node: "segments." in node.name,
              "last segment": lambda node: re.search(rf"segments\.{last}[./]", node.name) is not None}[int8_scope]
    done = {**_quantize_weights(path, path, chosen), "int8_scope": int8_scope}
    return {**done, "float32_nodes": FLOAT32_PARTS[int8_scope] or "exit heads and entropy"}


class _OnnxGraph:
    """One graph of a chain in onnxruntime: all its outputs, in the order they were exported."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        shape = self.session.get_inputs()[0].shape[0]
        self.batch = shape if isinstance(shape, int) else 0

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input: x})


class OnnxExitChain(ExitChain):
    """A multi-exit artifact in onnxruntime: every exit at once, or the chain run stage by stage with a rule."""

    name = "onnxruntime"

    def __init__(self, folder: Path):
        super().__init__(folder, read_onnx_metadata)

    def open_graph(self, path: Path) -> _OnnxGraph:
        return _OnnxGraph(path)
