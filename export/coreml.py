"""CoreML (.mlpackage, ML Program) export with coremltools, metadata, and the CoreML adapter.

CoreML models only execute on macOS: on other hosts the adapter reads the spec and metadata (so identity
and structure are verified) and raises PlatformUnavailable for the numeric checks, which verification then
reports as skipped.  int8-weights stores per-channel int8 weights (constexpr_affine_dequantize).
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import torch

from hetero.export.common import (METADATA_KEY, ExportError, PlatformUnavailable, RuntimeAdapter, example_input,
                                  graph_for)

TARGETS = ("iOS15", "iOS16", "iOS17", "iOS18", "macOS12", "macOS13", "macOS14", "macOS15")


def export_coreml(model: torch.nn.Module, path: Path, profile, metadata: dict, calibration=None,
                  accept=None) -> dict:
    """Write `model` as an ML Program .mlpackage directory at `path` with user-defined metadata."""
    import coremltools as ct

    example = example_input(profile, metadata["input_size"])
    traced = torch.jit.trace(graph_for(model, profile), (example,))
    compute = ct.precision.FLOAT32 if profile.precision == "fp32" else ct.precision.FLOAT16
    # ct.convert mutates the TensorTypes it is given: build fresh ones per call.  float32 I/O even for fp16
    # compute, so the app feeds float images and reads a float embedding, as on every other format.
    mlmodel = ct.convert(traced, convert_to="mlprogram", compute_precision=compute,
                         inputs=[ct.TensorType(name="images", shape=tuple(example.shape), dtype=np.float32)],
                         outputs=[ct.TensorType(name="embedding", dtype=np.float32)],
                         minimum_deployment_target=_target(profile))
    quantization = {"scheme": "fp16" if compute == ct.precision.FLOAT16 else "none",
                    "weights": "float16" if compute == ct.precision.FLOAT16 else "float32",
                    "activations": "float16" if compute == ct.precision.FLOAT16 else "float32", "io": "float32"}
    if profile.precision == "int8-weights":
        mlmodel = _int8_weights(mlmodel)
        quantization = {"scheme": "int8-weights", "weights": "int8 per-channel symmetric (constexpr dequantise)",
                        "activations": "float16", "io": "float32"}
    full = {**metadata, "quantization": quantization,
            "minimum_deployment_target": profile.minimum_deployment_target}
    mlmodel.user_defined_metadata[METADATA_KEY] = json.dumps(full)
    mlmodel.short_description = f"{metadata['family']} / {metadata['member']}: unit {metadata['embedding_dim']}-d " \
                                f"image embedding (space {metadata['space_id']})"
    mlmodel.save(str(path))
    return {"quantization": quantization, "minimum_deployment_target": profile.minimum_deployment_target}


def _target(profile):
    import coremltools as ct

    name = profile.minimum_deployment_target
    if name is None:
        return None
    if name not in TARGETS or not hasattr(ct.target, name):
        raise ExportError(f"profile {profile.name!r}: minimum_deployment_target {name!r} is not one of "
                          f"{', '.join(TARGETS)}")
    return getattr(ct.target, name)


def _int8_weights(mlmodel):
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights

    config = OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                     weight_threshold=0)  # small members too: quantise every weight
    return linear_quantize_weights(mlmodel, OptimizationConfig(global_config=config))


def read_coreml_metadata(path: Path) -> dict:
    facts = inspect_artifact(path)
    if facts["metadata"] is None:
        raise ExportError(f"{path}: no '{METADATA_KEY}' entry in the CoreML user-defined metadata")
    return facts["metadata"]


def inspect_artifact(path: Path) -> dict:
    """Spec facts without executing (works on Linux): metadata, I/O shapes, elements per weight dtype.

    Quantised weights are counted by their stored dtype (the int8 data of constexpr ops), not by the
    float type they are dequantised to.
    """
    import coremltools as ct
    from coremltools.proto import MIL_pb2

    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    description = spec.description
    user = dict(description.metadata.userDefined)
    metadata = json.loads(user[METADATA_KEY]) if METADATA_KEY in user else None
    weights: dict[str, int] = {}
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            for op in block.operations:
                if not op.type.startswith("const"):
                    continue
                stored = op.attributes.get("quantized_data") or op.attributes.get("data") or op.attributes.get("val")
                if stored is None or stored.type.WhichOneof("type") != "tensorType":
                    continue
                tensor = stored.type.tensorType
                count = int(np.prod([d.constant.size for d in tensor.dimensions] or [1]))
                if count >= 64:  # weights, not scalars
                    name = MIL_pb2.DataType.Name(tensor.dataType)
                    weights[name] = weights.get(name, 0) + count
    return {
        "metadata": metadata,
        "inputs": {f.name: _shape(f) for f in description.input},
        "outputs": {f.name: _shape(f) for f in description.output},
        "weight_dtypes": weights,
        "spec_type": spec.WhichOneof("Type"),
    }


def _shape(feature) -> list[int]:
    kind = feature.type.WhichOneof("Type")
    if kind == "multiArrayType":
        return [int(d) for d in feature.type.multiArrayType.shape]
    if kind == "imageType":
        return [1, 3, int(feature.type.imageType.height), int(feature.type.imageType.width)]
    return []


class CoreMLAdapter(RuntimeAdapter):
    """coremltools' MLModel.predict (macOS only); elsewhere PlatformUnavailable after reading the metadata."""

    name = "coreml"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.metadata = read_coreml_metadata(self.path)  # works on any host
        if platform.system() != "Darwin":
            raise PlatformUnavailable(f"CoreML models execute only on macOS (this host: {platform.system()}); "
                                      f"identity, metadata and structure were read from the spec instead", "macOS")
        import coremltools as ct

        self.model = ct.models.MLModel(str(self.path))
        self.batch = int(self.metadata.get("batch") or 1)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict({"images": batch})["embedding"], dtype=np.float32)
