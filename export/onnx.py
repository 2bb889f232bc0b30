"""ONNX export (torch.onnx) and the onnxruntime adapter."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from hetero.export.common import METADATA_KEY, ExportError, RuntimeAdapter, make_inputs_nhwc


def export_onnx(model: torch.nn.Module, path: Path, profile, metadata: dict, calibration=None) -> dict:
    """Write `model` as ONNX at `path` with metadata in metadata_props; return what was done."""
    import onnx

    if profile.precision != "fp32":
        raise ExportError(f"ONNX precision {profile.precision!r} is not supported by this exporter yet")
    size = metadata["input_size"]
    graph = make_inputs_nhwc(model) if profile.layout == "NHWC" else model
    example = torch.rand(max(1, profile.batch), 3, size, size)
    if profile.layout == "NHWC":
        example = example.permute(0, 2, 3, 1).contiguous()
    dynamic = {"images": {0: "batch"}, "embedding": {0: "batch"}} if profile.batch == 0 else None
    # The legacy exporter is ~20x faster than dynamo here and gives the same graph for these CNNs.
    torch.onnx.export(graph.eval(), (example,), str(path), input_names=["images"], output_names=["embedding"],
                      dynamic_axes=dynamic, opset_version=profile.opset, dynamo=False)
    proto = onnx.load(str(path))
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(metadata))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return {"quantization": "none"}


def read_onnx_metadata(path: Path) -> dict:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise ExportError(f"{path}: no '{METADATA_KEY}' entry in the ONNX metadata_props")
    return json.loads(props[METADATA_KEY])


class OnnxRuntimeAdapter(RuntimeAdapter):
    name = "onnxruntime"

    def __init__(self, path: Path):
        import onnxruntime as ort

        self.path = Path(path)
        self.metadata = read_onnx_metadata(self.path)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        shape = self.input.shape[0]
        self.batch = shape if isinstance(shape, int) else 0

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input.name: batch})[0]
