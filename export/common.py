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


# ------------------------------------------------------------------------------- multi-exit members: chains
#
# A multi-exit member is exported as a folder: stage<k> graphs chained one after the other (stage k takes the
# previous stage's features, images for the first, and gives its exit's embedding, its entropy and, but for
# the last, the features for stage k+1: inputs `images` or `features`, outputs `embedding`, `entropy`,
# `next_features`; CoreML refuses an output named as an input), an all-exits graph, and chain.json listing
# every file's sha256 and the chain's id.  What is the same for every format lives here: the torch modules
# each graph is made from, the loop that writes them and chain.json, reading chain.json back with its checks,
# and the runtime's loop (fixed-batch padding, every exit at once, the chained run with the rule).  A format
# gives only how to write one graph with its metadata, how to read a graph's metadata, and how to open and
# run one graph.

CHAIN = "chain.json"
CHAIN_FORMAT = "hetero-exit-chain/1"
# Where an int8 chain's weights are int8, tried in this order until the chain keeps verify's gate: every weight;
# the trunk's (exit heads and entropy float32); the last segment's, which no exit decision before the last reads
# (the earlier stages, the heads and the entropy float32: the decisions are torch's, and the last segment holds
# most of a trunk's weights, its width being the largest).
INT8_SCOPES = ("everywhere", "trunk", "last segment")
FLOAT32_PARTS = {"everywhere": None, "trunk": "exit heads and entropy",
                 "last segment": "every segment before the last, the exit heads and entropy"}


class ExitStage(torch.nn.Module):
    """Segment k of a multi-exit member: previous features (images for the first) -> its exit's embedding,
    its entropy and (but for the last) the features for segment k+1."""

    def __init__(self, model, index: int):
        super().__init__()
        self.model, self.index, self.last = model, index, index == len(model.exits) - 1

    def forward(self, x):
        embedding, entropy, features = self.model.stage(self.index, x)
        return (embedding, entropy) if self.last else (embedding, entropy, features)


class AllExits(torch.nn.Module):
    """Every exit at once (for servers): images -> embeddings (batch x exits x dim), entropies (batch x exits)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        embeddings = self.model.forward_exits(images)
        entropies = [self.model.entropy(e, k) for k, e in enumerate(embeddings)]
        return torch.stack(embeddings, dim=1), torch.stack(entropies, dim=1)


def write_exit_chain(model, folder, profile, metadata: dict, suffix: str, write_graph) -> dict:
    """Write a multi-exit member as a chain folder; return what was done ({"quantization": ...}).

    `write_graph(module, example, path, inputs, outputs, graph_metadata) -> quantization` is the format's part:
    convert `module` (traced on `example`) to one file at `path` with those input and output names, lower its
    precision as the profile says, and embed `graph_metadata` plus {"quantization": ...} in the file.  The
    first stage and the all-exits graph take images in the profile's layout (as plain members do); later stages
    take the previous stage's features as torch produced them (NCHW).  Each graph's metadata carries the
    chain's id, so stages of two exports never mix.
    """
    import json
    import uuid
    from pathlib import Path

    from hetero.files import sha256_path

    folder = Path(folder)
    folder.mkdir(parents=True)
    chain_id = uuid.uuid4().hex
    model = model.eval()
    images = example_input(profile, metadata["input_size"])
    features = images.permute(0, 3, 1, 2) if profile.layout == "NHWC" else images  # what segment 1 reads
    stages, quantization = [], {"scheme": "none"}
    for index in range(len(model.exits)):
        module = ExitStage(model, index)
        inputs = ["images" if index == 0 else "features"]
        outputs = ["embedding", "entropy"] + ([] if module.last else ["next_features"])
        path = folder / f"stage{index + 1}{suffix}"
        graph, example = (graph_for(module, profile), images) if index == 0 else (module, features)
        quantization = write_graph(graph, example, path, inputs, outputs, {
            **metadata, "inputs": inputs, "outputs": outputs,
            "chain": {"id": chain_id, "index": index + 1, "of": len(model.exits), "exit_stage": model.exits[index]}})
        stages.append({"file": path.name, "sha256": sha256_path(path), "exit_stage": model.exits[index],
                       "inputs": inputs, "outputs": outputs})
        if not module.last:
            with torch.no_grad():
                features = module(features)[2].contiguous()
    path = folder / f"all_exits{suffix}"
    write_graph(graph_for(AllExits(model), profile), images, path, ["images"], ["embeddings", "entropies"],
                {**metadata, "inputs": ["images"], "outputs": ["embeddings", "entropies"],
                 "chain": {"id": chain_id, "index": 0, "of": len(model.exits)}})
    chain = {"format": CHAIN_FORMAT, "id": chain_id, "metadata": {**metadata, "quantization": quantization},
             "stages": stages, "all_exits": {"file": path.name, "sha256": sha256_path(path)}}
    (folder / CHAIN).write_text(json.dumps(chain, indent=1))
    return {"quantization": quantization}


def read_exit_chain(folder, read_metadata) -> dict:
    """chain.json, after checking that every graph in it is the file that export wrote (sha256) and carries
    the chain's id (`read_metadata(path)`: the format's reader of one graph's metadata): stages of different
    exports are refused, naming the file."""
    import json
    from pathlib import Path

    from hetero.files import sha256_path

    folder = Path(folder)
    try:
        chain = json.loads((folder / CHAIN).read_text())
        files = [*chain["stages"], chain["all_exits"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ExportError(f"{folder / CHAIN}: not a readable exit chain ({type(err).__name__}: {err})") from None
    if chain.get("format") != CHAIN_FORMAT:
        raise ExportError(f"{folder / CHAIN}: format {chain.get('format')!r}, expected {CHAIN_FORMAT!r}")
    for entry in files:
        path = folder / Path(entry["file"]).name
        if not path.exists():
            raise ExportError(f"{path}: listed in {CHAIN} but missing")
        actual = sha256_path(path)  # of a file, or of a folder (a CoreML .mlpackage)
        if actual != entry["sha256"]:
            raise ExportError(f"{path}: sha256 {actual} is not the {entry['sha256']} that {CHAIN} lists: this graph "
                              f"comes from another export than the rest of the chain; export the member again")
        found = read_metadata(path).get("chain", {}).get("id")
        if found != chain["id"]:
            raise ExportError(f"{path}: belongs to chain {found!r}, not {chain['id']!r} of {CHAIN}")
    return chain


class ExitChain:
    """A multi-exit artifact in a runtime: every exit at once, or the chain run stage by stage with a rule.

    A format subclasses it with `open_graph(path)`, returning one graph with `batch` (0: any batch size) and
    `run(array) -> list of arrays` (its outputs in the order they were exported); everything else is here.
    Images are NCHW floats in [0, 1], turned to the artifact's layout for the graphs that take images.
    """

    name = "runtime"
    unavailable: str | None = None  # why the graphs cannot run on this host (CoreML off macOS), else None
    platform: str | None = None  # the only platform they run on, then

    def __init__(self, folder, read_metadata):
        from pathlib import Path

        self.folder = Path(folder)
        self.chain = read_exit_chain(self.folder, read_metadata)
        self.metadata = self.chain["metadata"]
        self.stages = [self.open_graph(self.folder / s["file"]) for s in self.chain["stages"]]
        self.all_exits = self.open_graph(self.folder / self.chain["all_exits"]["file"])
        self.batch = self.all_exits.batch

    def open_graph(self, path):
        raise NotImplementedError

    def _images(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        return np.ascontiguousarray(images.transpose(0, 2, 3, 1)) if self.metadata.get("layout") == "NHWC" else images

    @staticmethod
    def _batched(graph, x: np.ndarray) -> list[np.ndarray]:
        """graph.run over fixed-size batches when the graph has one (the last padded, the padding dropped)."""
        if graph.batch == 0:
            return [np.asarray(o, dtype=np.float32) for o in graph.run(x)]
        parts = []
        for start in range(0, len(x), graph.batch):
            chunk = x[start:start + graph.batch]
            pad = graph.batch - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            parts.append([np.asarray(o, dtype=np.float32)[:graph.batch - pad] for o in graph.run(chunk)])
        return [np.concatenate(column) for column in zip(*parts)]

    def exits(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings: images x exits x dim, entropies: images x exits) from the all-exits graph."""
        embeddings, entropies = self._batched(self.all_exits, self._images(images))[:2]
        return embeddings, entropies

    def embed(self, images: np.ndarray) -> np.ndarray:
        return self.exits(images)[0][:, -1]

    def run_chain(self, images: np.ndarray, thresholds: list[float], escalate_above: float | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What a device does: stage 1 on every image, then each next stage only on the images not yet sure.
        Returns (the exit that answered, 0-based, or len(stages) for the cloud; its embedding; every
        stage's entropies, NaN where a stage did not run)."""
        x = self._images(images)
        count, last = len(x), len(self.stages) - 1
        chosen = np.full(count, last, dtype=np.int64)
        answer = np.zeros((count, int(self.metadata["embedding_dim"])), dtype=np.float32)
        entropies = np.full((count, len(self.stages)), np.nan, dtype=np.float32)
        alive = np.arange(count)
        for index, graph in enumerate(self.stages):
            outputs = self._batched(graph, x)
            embedding, entropy = outputs[0], outputs[1].reshape(len(alive))
            entropies[alive, index] = entropy
            stop = entropy <= thresholds[index] if index < last else np.ones(len(alive), dtype=bool)
            if index == last and escalate_above is not None:
                chosen[alive[entropy > escalate_above]] = len(self.stages)
            if index < last:
                chosen[alive[stop]] = index
            answer[alive[stop]] = embedding[stop]
            if index < last:
                alive, x = alive[~stop], np.ascontiguousarray(outputs[2][~stop])
                if len(alive) == 0:
                    break
        return chosen, answer, entropies

    def close(self) -> None:
        for graph in [*self.stages, self.all_exits]:
            if hasattr(graph, "close"):
                graph.close()
