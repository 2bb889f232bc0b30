"""The worker that runs an exported artifact inside an isolated runtime environment.

It runs with that environment's interpreter (`python -I -c <this file's source>`), so it imports nothing
of hetero: only the standard library, numpy and the one runtime package.  Protocol (version 1), one JSON
object per line:

- the worker starts by announcing itself: {"protocol": 1, "python": ..., "numpy": ..., "engine": ...,
  "package": ..., "version": ...} (or {"protocol": 1, "error": ...} when the runtime does not import);
- request {"op": "open", "path": FILE} -> {"ok": true, "batch": N, "input": {...}, "output": {...}};
- request {"op": "run", "input": IN.npy, "output": OUT.npy} -> {"ok": true, "seconds": S}: the float32
  batch in IN (in the artifact's own layout) is run and the float32 result written to OUT (.npy, never
  pickled); S is the time the runtime itself took;
- the graphs of a multi-exit chain (several files open at once, several outputs each):
  {"op": "open", "path": FILE, "graph": NAME} -> {"ok": true, "batch": N, "outputs": K} opens FILE under NAME,
  and {"op": "run", "graph": NAME, "input": IN.npy, "outputs": [OUT0.npy, ...]} -> {"ok": true, "seconds": S}
  writes each of its K outputs, in the order they were exported, to its own .npy (the stage-by-stage loop and
  the exit rule run in hetero's process, the same code for every runtime);
- request {"op": "close"} -> the worker exits.
Any failure answers {"ok": false, "error": "..."}; the worker's stderr carries the runtime's own output,
and protocol lines go to a private copy of stdout, so a runtime printing to stdout cannot corrupt them.
"""
import json
import os
import platform
import sys
import time
import traceback

PROTOCOL = 1
ENGINES = {  # engine -> (distribution name, module to import)
    "tflite_runtime": ("tflite-runtime", "tflite_runtime.interpreter"),
    "ai_edge_litert": ("ai-edge-litert", "ai_edge_litert.interpreter"),
    "onnxruntime": ("onnxruntime", "onnxruntime"),
    "executorch": ("executorch", "executorch.runtime"),
}


def _version(distribution):
    from importlib.metadata import version

    return version(distribution)


class TFLite:
    def __init__(self, module, path):
        self.interpreter = module.Interpreter(model_path=path)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.batch = int(self.input["shape"][0])

    def describe(self):
        def detail(d):
            return {"shape": [int(x) for x in d["shape"]], "dtype": str(d["dtype"].__name__),
                    "quantization": [float(q) for q in d["quantization"]]}
        return {"batch": self.batch, "input": detail(self.input), "output": detail(self.output)}

    def run(self, batch):
        import numpy as np

        detail = self.input
        if detail["dtype"] != np.float32:  # a full-integer input: quantise with the file's scale and zero point
            scale, zero = detail["quantization"]
            info = np.iinfo(detail["dtype"])
            batch = np.clip(np.round(batch / scale + zero), info.min, info.max).astype(detail["dtype"])
        self.interpreter.set_tensor(detail["index"], batch)
        self.interpreter.invoke()
        out = self.interpreter.get_tensor(self.output["index"])
        scale, zero = self.output["quantization"]
        return (out.astype(np.float32) - zero) * scale if scale else out.astype(np.float32)


class TFLiteGraph:
    """One graph of a chain: its signature's outputs, ordered as exported (litert-torch names them output_<i>)."""

    def __init__(self, module, path):
        self.interpreter = module.Interpreter(model_path=path)
        self.runner = self.interpreter.get_signature_runner("serving_default")
        signature = self.interpreter.get_signature_list()["serving_default"]
        self.input = signature["inputs"][0]

        def order(name):
            tail = name.rsplit("_", 1)[-1]
            return (0, int(tail), name) if tail.isdigit() else (1, 0, name)
        self.outputs = sorted(signature["outputs"], key=order)
        self.batch = int(self.runner.get_input_details()[self.input]["shape"][0])

    def describe(self):
        return {"batch": self.batch, "outputs": len(self.outputs)}

    def run_all(self, batch):
        import numpy as np

        found = self.runner(**{self.input: batch})
        return [np.asarray(found[name], dtype=np.float32) for name in self.outputs]


class OnnxRuntime:
    def __init__(self, module, path):
        options = module.SessionOptions()
        options.log_severity_level = 3
        self.session = module.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0]
        shape = self.input.shape[0]
        self.batch = shape if isinstance(shape, int) else 0

    def describe(self):
        return {"batch": self.batch, "input": {"shape": [d if isinstance(d, int) else -1 for d in self.input.shape]},
                "output": {"shape": [d if isinstance(d, int) else -1 for d in self.session.get_outputs()[0].shape]}}

    def run(self, batch):
        return self.run_all(batch)[0]

    def run_all(self, batch):
        import numpy as np

        return [np.asarray(o, dtype=np.float32) for o in self.session.run(None, {self.input.name: batch})]


class OnnxGraph(OnnxRuntime):
    def describe(self):
        return {"batch": self.batch, "outputs": len(self.session.get_outputs())}


class ExecuTorch:
    def __init__(self, module, path):
        self.method = module.Runtime.get().load_program(path).load_method("forward")
        self.batch = 0

    def describe(self):
        return {"batch": self.batch, "input": {}, "output": {}}

    def run(self, batch):
        import numpy as np
        import torch

        return np.asarray(self.method.execute([torch.from_numpy(batch)])[0].numpy(), dtype=np.float32)


RUNNERS = {"tflite_runtime": TFLite, "ai_edge_litert": TFLite, "onnxruntime": OnnxRuntime, "executorch": ExecuTorch}
GRAPHS = {"tflite_runtime": TFLiteGraph, "ai_edge_litert": TFLiteGraph, "onnxruntime": OnnxGraph}


def main(engine):
    import importlib

    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the runtime prints goes to stderr, never into the protocol
    sys.stdout = sys.stderr

    def say(message):
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    distribution, module_name = ENGINES[engine]
    try:
        import numpy

        module = importlib.import_module(module_name)
        say({"protocol": PROTOCOL, "python": platform.python_version(), "numpy": numpy.__version__,
             "engine": engine, "package": distribution, "version": _version(distribution)})
    except Exception as err:  # noqa: BLE001 -- reported to the client, which says what is missing
        say({"protocol": PROTOCOL, "error": f"{type(err).__name__}: {err}"})
        return
    model, graphs = None, {}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "close":
                say({"ok": True})
                return
            if request["op"] == "open" and "graph" in request:
                if engine not in GRAPHS:
                    raise ValueError(f"{distribution} does not run multi-exit chains")
                graphs[request["graph"]] = GRAPHS[engine](module, request["path"])
                say({"ok": True, **graphs[request["graph"]].describe()})
            elif request["op"] == "open":
                model = RUNNERS[engine](module, request["path"])
                say({"ok": True, **model.describe()})
            elif request["op"] == "run":
                import numpy as np

                batch = np.ascontiguousarray(np.load(request["input"], allow_pickle=False), dtype=np.float32)
                started = time.perf_counter()
                out = graphs[request["graph"]].run_all(batch) if "graph" in request else model.run(batch)
                seconds = time.perf_counter() - started  # the runtime alone, without the protocol's files
                if "graph" in request:
                    for array, path in zip(out, request["outputs"]):
                        np.save(path, np.ascontiguousarray(array, dtype=np.float32))
                else:
                    np.save(request["output"], np.ascontiguousarray(out, dtype=np.float32))
                say({"ok": True, "seconds": seconds})
            else:
                say({"ok": False, "error": f"unknown op {request['op']!r}"})
        except Exception as err:  # noqa: BLE001 -- every failure is an answer, never a dead worker
            traceback.print_exc()
            say({"ok": False, "error": f"{type(err).__name__}: {str(err).strip()[:500]}"})


if __name__ == "__main__":
    main(sys.argv[1])
