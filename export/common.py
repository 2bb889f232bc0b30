"""Pieces every exporter and runtime adapter shares: the metadata key, layout, batching, parity, quiet output."""
from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager

import numpy as np
import torch

from hetero.errors import ExportError, PlatformUnavailable, RuntimeUnavailable  # noqa: F401 -- the converters' errors

METADATA_KEY = "hetero"
EXIT_AGREEMENT = 0.99  # the exit a device's chained run picks must be torch's for this share of queries


class _ChannelsLastInput(torch.nn.Module):
    """Take NHWC images (as most mobile camera pipelines hand them over) and feed the NCHW member."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.permute(0, 3, 1, 2))


def make_inputs_nhwc(model: torch.nn.Module) -> torch.nn.Module:
    return _ChannelsLastInput(model)


def chain_exit_agreement(chain, model, images: torch.Tensor, rule: dict) -> tuple[float, list[float]]:
    """How often a device's chained run (stage by stage, stopping by the calibrated `rule`) stops at the exit
    torch's rule picks for `images`, and the share stopping at each exit (the cloud last).  Export holds a
    chain to what verify will hold it to."""
    from hetero.maths import apply_rule
    from hetero.models import exit_embeddings, exit_entropies

    device, _, _ = chain.run_chain(images.numpy(), rule["thresholds"], rule["escalate_above"])
    device = torch.from_numpy(np.asarray(device))
    torch_exit = apply_rule(exit_entropies(model, exit_embeddings(model, images)), rule["thresholds"],
                            rule["escalate_above"])
    shares = [float((device == k).float().mean()) for k in range(len(model.exits) + 1)]
    return float((device == torch_exit).float().mean()), shares


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


# ----------------------------------------------------------------------------------------------- helpers


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def parity(adapter: "RuntimeAdapter", model: torch.nn.Module, images: torch.Tensor) -> dict:
    """Min and mean cosine between an exported artifact (through its runtime) and the torch member."""
    with torch.no_grad():
        reference = model.eval()(images).numpy()
    cosine = cosine_rows(adapter.embed(images.numpy()), reference)
    return {"images": len(images), "min_cosine": round(float(cosine.min()), 6),
            "mean_cosine": round(float(cosine.mean()), 6)}


def example_input(profile, size: int) -> torch.Tensor:
    """One example batch in the profile's layout (for tracing and export)."""
    example = torch.rand(max(1, profile.batch), 3, size, size)
    return example.permute(0, 2, 3, 1).contiguous() if profile.layout == "NHWC" else example


def graph_for(model: torch.nn.Module, profile) -> torch.nn.Module:
    """The member as the device sees it: NHWC input when the profile says so."""
    return (make_inputs_nhwc(model) if profile.layout == "NHWC" else model).eval()


def need_calibration(images, profile) -> torch.Tensor:
    if images is None or len(images) == 0:
        raise ExportError(f"profile {profile.name!r} ({profile.format} {profile.precision}) needs calibration "
                          f"images; export through `export_member`, which takes them from the training split")
    return images


def split_calibration(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(images to calibrate on, images to check parity on): alternate picks, so the check is not judged on
    the very images whose ranges were fitted."""
    if len(images) < 2:
        return images, images
    return images[0::2], images[1::2]


def keeps_parity(check: dict, tolerance: float) -> bool:
    """A quantisation scheme is kept only with half the profile's cosine budget to spare: the tail on
    held-out classes is worse than on training images (seen: 0.994 on training images, 0.979 held out)."""
    return check["min_cosine"] >= 1 - (1 - tolerance) / 2


@contextmanager
def converter_output(verbose: bool = False):
    """Keep what converters print (progress bars, warnings, C++ logs) off the terminal unless `verbose`.

    Output is caught at the file-descriptor level, where native code writes too; `tail()` of the yielded
    object returns its end, for an error message when the conversion fails.
    """
    class Caught:
        text = ""

        def tail(self, lines: int = 15) -> str:
            return "\n".join(self.text.strip().splitlines()[-lines:])

    caught = Caught()
    if verbose:
        yield caught
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved, streams = (os.dup(1), os.dup(2)), (sys.stdout, sys.stderr)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        # Python-level writers too, where sys.stdout/err no longer write to fds 1 and 2 (a test's capture).
        sys.stdout = open(1, "w", closefd=False, errors="replace")  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False, errors="replace")  # noqa: SIM115
        try:
            yield caught
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = streams
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            caught.text = sink.read().decode("utf-8", "replace")
