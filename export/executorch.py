"""ExecuTorch (.pte) export with the XNNPACK CPU delegate, and the ExecuTorch runtime adapter.

The metadata JSON is stored in the program itself as a constant method `hetero_metadata` that returns the
UTF-8 bytes as a uint8 tensor, so any ExecuTorch runtime can read it without a side file.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from hetero.export.common import METADATA_KEY, ExportError, RuntimeAdapter, example_input, graph_for

METADATA_METHOD = f"{METADATA_KEY}_metadata"


def export_executorch(model: torch.nn.Module, path: Path, profile, metadata: dict, calibration=None,
                      accept=None) -> dict:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    if profile.precision != "fp32":
        raise ExportError(f"profile {profile.name!r}: ExecuTorch precision {profile.precision!r} is not supported "
                          f"by this exporter (static int8 loses parity on mobile blocks); use fp32")
    if profile.batch == 0:
        raise ExportError(f"profile {profile.name!r}: the ExecuTorch exporter needs a fixed batch size")
    quantization = {"scheme": "none", "delegate": "XNNPACK"}
    blob = torch.tensor(list(json.dumps({**metadata, "quantization": quantization}).encode()), dtype=torch.uint8)
    program = torch.export.export(graph_for(model, profile), (example_input(profile, metadata["input_size"]),))
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                          constant_methods={METADATA_METHOD: blob})
    Path(path).write_bytes(lowered.to_executorch().buffer)
    return {"quantization": quantization}


def _program(path: Path):
    from executorch.runtime import Runtime

    return Runtime.get().load_program(str(path))


def read_executorch_metadata(path: Path) -> dict:
    program = _program(path)
    if METADATA_METHOD not in program.method_names:
        raise ExportError(f"{path}: no '{METADATA_METHOD}' method in the ExecuTorch program")
    blob = program.load_method(METADATA_METHOD).execute([])[0]
    return json.loads(bytes(blob.numpy().astype(np.uint8).tolist()))


class ExecuTorchAdapter(RuntimeAdapter):
    name = "executorch"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.metadata = read_executorch_metadata(self.path)
        self.forward = _program(self.path).load_method("forward")
        self.batch = int(self.metadata.get("batch") or 1)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.forward.execute([torch.from_numpy(np.ascontiguousarray(batch))])[0].numpy()
