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

from hetero.export.common import (METADATA_KEY, ExitChain, ExportError, PlatformUnavailable, RuntimeAdapter,
                                  example_input, graph_for, write_exit_chain)

TARGETS = ("iOS15", "iOS16", "iOS17", "iOS18", "macOS12", "macOS13", "macOS14", "macOS15")


def export_coreml(model: torch.nn.Module, path: Path, profile, metadata: dict, calibration=None,
                  accept=None) -> dict:
    """Write `model` as an ML Program .mlpackage directory at `path` with user-defined metadata."""
    example = example_input(profile, metadata["input_size"])
    mlmodel, quantization = _convert(graph_for(model, profile), example, profile, ["images"], ["embedding"])
    full = {**metadata, "quantization": quantization,
            "minimum_deployment_target": profile.minimum_deployment_target}
    mlmodel.user_defined_metadata[METADATA_KEY] = json.dumps(full)
    mlmodel.short_description = f"{metadata['family']} / {metadata['member']}: unit {metadata['embedding_dim']}-d " \
                                f"image embedding (space {metadata['space_id']})"
    mlmodel.save(str(path))
    return {"quantization": quantization, "minimum_deployment_target": profile.minimum_deployment_target}


def _convert(module: torch.nn.Module, example: torch.Tensor, profile, inputs: list[str], outputs: list[str]):
    """(ML Program of `module` traced on `example` in the profile's precision, what was done)."""
    import coremltools as ct

    traced = torch.jit.trace(module.eval(), (example,))
    compute = ct.precision.FLOAT32 if profile.precision == "fp32" else ct.precision.FLOAT16
    # ct.convert mutates the TensorTypes it is given: build fresh ones per call.  float32 I/O even for fp16
    # compute, so the app feeds float images and reads a float embedding, as on every other format.
    mlmodel = ct.convert(traced, convert_to="mlprogram", compute_precision=compute,
                         inputs=[ct.TensorType(name=inputs[0], shape=tuple(example.shape), dtype=np.float32)],
                         outputs=[ct.TensorType(name=name, dtype=np.float32) for name in outputs],
                         minimum_deployment_target=_target(profile))
    quantization = {"scheme": "fp16" if compute == ct.precision.FLOAT16 else "none",
                    "weights": "float16" if compute == ct.precision.FLOAT16 else "float32",
                    "activations": "float16" if compute == ct.precision.FLOAT16 else "float32", "io": "float32"}
    if profile.precision == "int8-weights":
        mlmodel = _int8_weights(mlmodel)
        quantization = {"scheme": "int8-weights", "weights": "int8 per-channel symmetric (constexpr dequantise)",
                        "activations": "float16", "io": "float32"}
    return mlmodel, quantization


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


# ------------------------------------------------------------------------------- multi-exit members: chains
# The chain folder, chain.json and the runtime's loop are format-independent (hetero.export.common); here is
# only how one .mlpackage of a chain is written and run.  coremltools converts on Linux but predicts on macOS
# only: there the chain runs; elsewhere its structure is read from each graph's spec.


def export_exit_chain(model, folder: Path, profile, metadata: dict, int8_scope: str = "everywhere") -> dict:
    """A multi-exit member as a folder: stage<k>.mlpackage chained graphs, all_exits.mlpackage, and chain.json
    listing every package's sha256 (see `write_exit_chain`); float32 I/O, the profile's compute precision.
    `int8_scope` is accepted for the exporter's int8 fallback, but the export gate cannot run a CoreML chain
    off macOS, so it never asks for another here: int8-weights quantises every weight, as for plain members."""
    def write_graph(module, example, path: Path, inputs: list[str], outputs: list[str], graph_metadata: dict):
        mlmodel, quantization = _convert(module, example, profile, inputs, outputs)
        mlmodel.user_defined_metadata[METADATA_KEY] = json.dumps(
            {**graph_metadata, "quantization": quantization,
             "minimum_deployment_target": profile.minimum_deployment_target})
        chain = graph_metadata["chain"]
        mlmodel.short_description = (f"{metadata['family']} / {metadata['member']}: " + (
            f"stage {chain['index']} of {chain['of']} of an exit chain" if chain["index"] else
            f"every exit of an exit chain of {chain['of']}") + f" (space {metadata['space_id']})")
        mlmodel.save(str(path))
        return quantization

    done = write_exit_chain(model, folder, profile, metadata, ".mlpackage", write_graph)
    return {**done, "minimum_deployment_target": profile.minimum_deployment_target}


class _CoreMLGraph:
    """One graph of a chain: its spec facts on any host; MLModel.predict on macOS only."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.facts = inspect_artifact(self.path)
        self.outputs = (self.facts["metadata"] or {}).get("outputs") or list(self.facts["outputs"])
        self.inputs = (self.facts["metadata"] or {}).get("inputs") or list(self.facts["inputs"])
        shape = self.facts["inputs"].get(self.inputs[0]) or [1]
        self.batch = int(shape[0])
        self.model = None
        if platform.system() == "Darwin":
            import coremltools as ct

            self.model = ct.models.MLModel(str(self.path))

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        if self.model is None:
            raise PlatformUnavailable(f"CoreML models execute only on macOS (this host: {platform.system()})",
                                      "macOS")
        found = self.model.predict({self.inputs[0]: x})
        return [np.asarray(found[name], dtype=np.float32) for name in self.outputs]


class CoreMLExitChain(ExitChain):
    """A multi-exit artifact in CoreML: on macOS it runs like every chain; elsewhere chain.json and every
    package's sha256 and chain id are checked and each graph's spec is read (`graphs()`), but running raises
    PlatformUnavailable (`unavailable` says so before anything runs)."""

    name = "coreml"

    def __init__(self, folder: Path):
        super().__init__(folder, read_coreml_metadata)
        if platform.system() != "Darwin":
            self.unavailable = (f"CoreML models execute only on macOS (this host: {platform.system()}); the chain's "
                                f"files, ids and each graph's spec were read instead")
            self.platform = "macOS"

    def open_graph(self, path: Path) -> _CoreMLGraph:
        return _CoreMLGraph(path)

    def graphs(self) -> list[tuple[str, dict]]:
        """(file name, spec facts) of every stage graph in order, then the all-exits graph."""
        return [(g.path.name, g.facts) for g in [*self.stages, self.all_exits]]


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
