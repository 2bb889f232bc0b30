"""Pieces every exporter and runtime adapter shares: the metadata key, errors, layout and batching."""
from __future__ import annotations

import numpy as np
import torch

METADATA_KEY = "hetero"


class ExportError(RuntimeError):
    """An export or runtime step that failed, with a message for people."""


class RuntimeUnavailable(ExportError):
    """The runtime cannot execute this artifact on this host (CoreML outside macOS, a missing package).

    Verification reports the numeric checks as skipped with this reason, never as passed.
    """


class _ChannelsLastInput(torch.nn.Module):
    """Take NHWC images (as most mobile camera pipelines hand them over) and feed the NCHW member."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.permute(0, 3, 1, 2))


def make_inputs_nhwc(model: torch.nn.Module) -> torch.nn.Module:
    return _ChannelsLastInput(model)


class RuntimeAdapter:
    """One small interface over every runtime: NCHW float images in [0, 1] -> unit embeddings.

    Subclasses load the artifact, read its own metadata (never the training config) and implement
    `run` for one batch in the artifact's layout; `embed` handles layout and fixed batch sizes.
    """

    name = "runtime"
    metadata: dict
    batch: int = 0  # 0: any batch size

    def run(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def embed(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        if self.metadata.get("layout") == "NHWC":
            images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
        if self.batch == 0:
            return np.asarray(self.run(images), dtype=np.float32)
        out = []
        for start in range(0, len(images), self.batch):
            chunk = images[start:start + self.batch]
            pad = self.batch - len(chunk)
            if pad:  # fixed-batch artifacts: pad the last chunk and drop the padding's outputs
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            out.append(np.asarray(self.run(chunk), dtype=np.float32)[: self.batch - pad])
        return np.concatenate(out)
