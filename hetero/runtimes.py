"""Runtime environments: run exported artifacts on the runtime versions devices really run.

An Android app pins the TFLite interpreter it shipped with; a board runs whatever onnxruntime its image
has.  `hetero runtimes add tflite-runtime==2.14.0` creates an isolated virtual environment for one runtime
package at one version (in the user's cache directory; tflite-runtime's numpy < 2 never touches hetero's
own environment), and artifacts run there out of process through :mod:`hetero.runtime_worker`: a small
versioned request/response protocol over the worker's stdin/stdout, arrays as .npy files, nothing pickled.
A worker that crashes or hangs raises :class:`WorkerFailed` with its stderr, which verification reports as
a failed check.

A profile lists the runtime versions it must work on (`runtimes: [ai-edge-litert>=2.3,
tflite-runtime==2.14.0]`); :func:`targets` resolves each to this process (when the installed package
satisfies it) or to an isolated environment, or says which environment to create.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from hetero import formats
from hetero.errors import ConfigError, ExportError, HeteroError, RuntimeUnavailable
from hetero.export.common import ExitChain, RuntimeAdapter
from hetero.files import DirectoryLock

log = logging.getLogger("hetero.runtimes")

ENV_RECORD = "hetero-env.json"
PROTOCOL = 1
WORKER = Path(__file__).with_name("runtime_worker.py")


class RuntimeEnvError(HeteroError):
    """An environment that cannot be created, found or used, with pip's or the runtime's own words."""


class WorkerFailed(ExportError):
    """An isolated runtime's worker that crashed, hung or answered nonsense; carries its stderr."""


def home() -> Path:
    """Where environments live: $HETERO_RUNTIMES, else the user's cache directory."""
    if os.environ.get("HETERO_RUNTIMES"):
        return Path(os.environ["HETERO_RUNTIMES"])
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("hetero")) / "runtimes"


# ------------------------------------------------------------------------------------------ requirements


def installed_version(distribution: str) -> str | None:
    """The version of `distribution` in this process's environment, or None."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def needs_environment(text: str) -> bool:
    """Whether requirement `text` can only be met by an isolated environment (not by this process)."""
    requirement, _, runtime = formats.parse_requirement(text)
    local = installed_version(runtime.distribution) if runtime.adapter else None
    return bool(runtime.engine) and not (local and requirement.specifier.contains(local, prereleases=True))


# ------------------------------------------------------------------------------------------ environments


@dataclass
class Environment:
    path: Path
    distribution: str
    version: str
    engine: str
    python: str  # the version of the environment's interpreter
    created: str
    seconds: float  # how long creating it took

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def interpreter(self) -> Path:
        return self.path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")

    @property
    def label(self) -> str:
        return f"{self.distribution} {self.version}"

    def problem(self) -> str | None:
        """Why the environment cannot be used now (deleted by hand, interpreter gone), or None."""
        if not self.interpreter.exists():
            return f"its interpreter {self.interpreter} is missing; re-create it: hetero runtimes add " \
                   f"{self.distribution}=={self.version}"
        return None


def environments() -> list[Environment]:
    found = []
    root = home()
    for record in sorted(root.glob(f"*/{ENV_RECORD}")) if root.is_dir() else []:
        try:
            data = json.loads(record.read_text())
            found.append(Environment(record.parent, data["distribution"], data["version"], data["engine"],
                                     data["python"], data["created"], data["seconds"]))
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("ignoring %s: not a hetero runtime environment record", record)
    return found


def find(requirement) -> Environment | None:
    """The newest usable environment whose package and version satisfy `requirement`."""
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    name = canonicalize_name(requirement.name)
    matching = [e for e in environments()
                if e.distribution == name and requirement.specifier.contains(e.version, prereleases=True)]
    return max(matching, key=lambda e: Version(e.version), default=None)


def _run(command: list, what: str, timeout: float = 900) -> str:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        said = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()
                and not line.startswith("WARNING: Location")]
        errors = [line for line in said if "ERROR" in line or "error" in line.lower()] or said
        raise RuntimeEnvError(f"{what} failed: " + " | ".join(errors[-4:])[:1500])
    return done.stdout


def add(text: str, python: str | None = None) -> Environment:
    """Create (or re-create) the isolated environment for one runtime requirement; return it."""
    from packaging.version import Version

    requirement, _, runtime = formats.parse_requirement(text)
    if runtime.engine is None:
        raise ConfigError(f"{runtime.distribution} cannot run out of process; it is used in this environment only")
    if python is not None and shutil.which(python) is None:  # a path, or a name looked up on PATH
        raise ConfigError(f"--python {python}: no such interpreter (not an executable file, nor a command on PATH); "
                          f"give the path of a Python, e.g. /usr/bin/python3.10")
    root = home()
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with DirectoryLock(root, "runtimes add"):
        work = Path(tempfile.mkdtemp(prefix=f".hetero-tmp.{runtime.distribution}.", dir=root))
        try:
            _run([python or sys.executable, "-m", "venv", work], f"creating a virtual environment in {work}")
            interpreter = work / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
            pip = [interpreter, "-m", "pip", "install", "--disable-pip-version-check", "--quiet"]
            _run([*pip, str(requirement), *runtime.needs], f"pip install {requirement}")
            ask = f"from importlib.metadata import version; print(version({runtime.distribution!r}))"
            version = _run([interpreter, "-c", ask], "reading the version").strip()
            below = runtime.numpy2_from
            if below and Version(version) < Version(below):
                _run([*pip, "numpy<2"], f"pip install numpy<2 (for {runtime.distribution} {version})")
            hello = handshake(interpreter, runtime.engine)
            record = {"distribution": runtime.distribution, "version": version, "engine": runtime.engine,
                      "python": hello["python"], "numpy": hello["numpy"], "requirement": str(requirement),
                      "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "seconds": round(time.perf_counter() - started, 1)}
            (work / ENV_RECORD).write_text(json.dumps(record, indent=2))
            final = root / f"{runtime.distribution}-{version}"
            if final.exists():
                shutil.rmtree(final)
            os.replace(work, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return next(e for e in environments() if e.path == final)


def ensure(text: str) -> Environment:
    """An environment satisfying `text`: an existing usable one, or a new one."""
    requirement, _, _ = formats.parse_requirement(text)
    existing = find(requirement)
    return existing if existing is not None and existing.problem() is None else add(text)


def remove(name_or_requirement: str) -> list[Environment]:
    """Delete the environments a name ('tflite-runtime-2.14.0') or requirement ('tflite-runtime==2.14.0') picks."""
    envs = environments()
    chosen = [e for e in envs if e.name == name_or_requirement]
    if not chosen:
        requirement, _, _ = formats.parse_requirement(name_or_requirement)
        chosen = [e for e in envs if e.distribution == requirement.name.lower().replace("_", "-")
                  and requirement.specifier.contains(e.version, prereleases=True)]
    if not chosen:
        listed = ", ".join(e.name for e in envs) or "none"
        raise RuntimeEnvError(f"no runtime environment {name_or_requirement!r}; environments: {listed}")
    with DirectoryLock(home(), "runtimes remove"):
        for env in chosen:
            shutil.rmtree(env.path)
    return chosen


# ------------------------------------------------------------------------------------------------ worker


def handshake(interpreter: Path, engine: str) -> dict:
    worker = _Worker(interpreter, engine, "a new environment")
    try:
        return worker.hello
    finally:
        worker.close()


class _Worker:
    """One worker process and its protocol; every failure is a WorkerFailed with the worker's stderr."""

    def __init__(self, interpreter: Path, engine: str, label: str, timeout: float = 120):
        self.label = label
        self.stderr = tempfile.TemporaryFile(mode="w+b")
        self.process = subprocess.Popen([str(interpreter), "-I", "-c", WORKER.read_text(), engine],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.hello = self.receive(timeout)
        if self.hello.get("protocol") != PROTOCOL:
            raise self.failure(f"speaks protocol {self.hello.get('protocol')!r}, this hetero {PROTOCOL}")
        if "error" in self.hello:
            raise RuntimeUnavailable(f"{label}: the runtime does not import: {self.hello['error']}")

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def said(self) -> str:
        self.stderr.seek(0)
        lines = [line for line in self.stderr.read().decode("utf-8", "replace").splitlines() if line.strip()]
        return " | ".join(lines[-6:])[-1200:]

    def failure(self, what: str) -> WorkerFailed:
        self.close(kill=True)
        said = self.said()
        return WorkerFailed(f"{self.label}: the worker {what}" + (f"; its stderr: {said}" if said else ""))

    def receive(self, timeout: float) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise self.failure(f"did not answer within {timeout:g} s (hung; killed)") from None
        if line is None:
            code = self.process.wait()
            raise self.failure(f"exited with status {code}")
        try:
            return json.loads(line)
        except ValueError:
            raise self.failure(f"answered something that is not the protocol: {line[:200]!r}") from None

    def request(self, message: dict, timeout: float) -> dict:
        if self.process.poll() is not None:
            raise self.failure(f"is gone (status {self.process.returncode})")
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self.failure("closed its input (crashed)") from None
        answer = self.receive(timeout)
        if not answer.get("ok"):
            raise WorkerFailed(f"{self.label}: {answer.get('error', 'failed without saying why')}")
        return answer

    def close(self, kill: bool = False) -> None:
        if self.process.poll() is None:
            if not kill:
                try:
                    self.process.stdin.write(json.dumps({"op": "close"}) + "\n")
                    self.process.stdin.flush()
                    self.process.wait(timeout=5)
                except (OSError, subprocess.TimeoutExpired):
                    pass
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()


class IsolatedRuntime(RuntimeAdapter):
    """An artifact run by a worker in an isolated environment; metadata read by this process."""

    def __init__(self, env: Environment, path: Path, metadata: dict, timeout: float = 120):
        self.name, self.metadata, self.timeout = env.label, metadata, timeout
        problem = env.problem()
        if problem:
            raise RuntimeEnvError(f"runtime environment {env.name}: {problem}")
        self._files = Path(tempfile.mkdtemp(prefix="hetero-worker-"))
        self._worker = _Worker(env.interpreter, env.engine, env.label, timeout)
        self.version = self._worker.hello.get("version")
        self.batch = int(self._worker.request({"op": "open", "path": str(Path(path).resolve())}, timeout)["batch"])

    def run(self, batch: np.ndarray) -> np.ndarray:
        given, result = self._files / "input.npy", self._files / "output.npy"
        np.save(given, np.ascontiguousarray(batch, dtype=np.float32))
        answer = self._worker.request({"op": "run", "input": str(given), "output": str(result)}, self.timeout)
        self.last_run_seconds = float(answer.get("seconds", 0.0))
        return np.load(result, allow_pickle=False)

    def close(self) -> None:
        self._worker.close()
        shutil.rmtree(self._files, ignore_errors=True)

    def __del__(self):
        if hasattr(self, "_worker"):
            self.close()


class IsolatedExitChain(ExitChain):
    """A multi-exit chain run by a worker in an isolated environment: the worker runs each graph; chain.json
    and its checks, the fixed-batch loop and the stage-by-stage rule are hetero's own (`ExitChain`), the same
    code as in this process."""

    def __init__(self, env: Environment, folder: Path, read_metadata, timeout: float = 120):
        self.name, self.env, self.timeout = env.label, env, timeout
        problem = env.problem()
        if problem:
            raise RuntimeEnvError(f"runtime environment {env.name}: {problem}")
        self._worker, self.version = None, None  # started once chain.json and its files are checked
        self._files = Path(tempfile.mkdtemp(prefix="hetero-worker-"))
        self.seconds = 0.0  # the runtime's own time, over every graph run
        try:
            super().__init__(folder, read_metadata)
        except BaseException:
            self.close()
            raise

    def open_graph(self, path: Path) -> "_WorkerGraph":
        if self._worker is None:
            self._worker = _Worker(self.env.interpreter, self.env.engine, self.env.label, self.timeout)
            self.version = self._worker.hello.get("version")
        return _WorkerGraph(self, path)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """The last exit (all-exits graph); `last_run_seconds` is the worker's own time for it."""
        before = self.seconds
        out = super().embed(images)
        self.last_run_seconds = self.seconds - before
        return out

    def close(self) -> None:
        if getattr(self, "_worker", None) is not None:
            self._worker.close()
        if hasattr(self, "_files"):
            shutil.rmtree(self._files, ignore_errors=True)

    def __del__(self):
        self.close()


class _WorkerGraph:
    """One graph of a chain, opened in the chain's worker under its file name."""

    def __init__(self, chain: IsolatedExitChain, path: Path):
        self.chain, self.name = chain, Path(path).name
        answer = chain._worker.request({"op": "open", "graph": self.name, "path": str(Path(path).resolve())},
                                       chain.timeout)
        self.batch, self.count = int(answer["batch"]), int(answer["outputs"])

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        files = self.chain._files
        given, results = files / "input.npy", [files / f"output{k}.npy" for k in range(self.count)]
        np.save(given, np.ascontiguousarray(x, dtype=np.float32))
        answer = self.chain._worker.request({"op": "run", "graph": self.name, "input": str(given),
                                             "outputs": [str(r) for r in results]}, self.chain.timeout)
        self.chain.seconds += float(answer.get("seconds", 0.0))
        return [np.load(r, allow_pickle=False) for r in results]


# ----------------------------------------------------------------------------------- runtimes per profile


@dataclass
class Target:
    """One runtime version an artifact is checked on: in this process, in an environment, or missing here."""

    runtime: formats.Runtime
    version: str | None
    environment: Environment | None = None
    requirement: str | None = None  # what the profile declared
    missing: str | None = None  # why nothing here satisfies it

    @property
    def label(self) -> str:
        return f"{self.runtime.distribution} {self.version}" if self.version else str(self.requirement)

    def open(self, spec: formats.Format, path: Path):
        if self.missing:
            raise RuntimeUnavailable(self.missing)
        if self.environment is None:
            adapter = spec.open(path, self.runtime.name)
            adapter.name = self.label
            return adapter
        return IsolatedRuntime(self.environment, path, spec.read_metadata(path))

    def open_chain(self, spec: formats.Format, folder: Path):
        """A multi-exit chain folder on this runtime: in this process (the format's chain runtime) or run by a
        worker in the environment; chain.json and every graph's sha256 and chain id are checked first."""
        if self.missing:
            raise RuntimeUnavailable(self.missing)
        if self.environment is None:
            chain = spec.open_exit_chain(folder)
            chain.name = self.label
            return chain
        return IsolatedExitChain(self.environment, Path(folder), spec.read_metadata)


def _resolve(spec: formats.Format, text: str) -> Target:
    requirement, _, runtime = formats.parse_requirement(text)
    local = installed_version(runtime.distribution) if runtime.adapter else None
    if local and requirement.specifier.contains(local, prereleases=True):
        return Target(runtime, local, None, text)
    env = find(requirement) if runtime.engine else None
    if env is not None and env.problem() is None:
        return Target(runtime, env.version, env, text)
    why = env.problem() if env is not None else (
        f"no environment with {text} here: create it with `hetero runtimes add {text}`" if runtime.engine else
        f"{runtime.distribution} {local or '(not installed)'} here does not satisfy {text}")
    return Target(runtime, None, None, text, missing=why)


def provide(profile, announce=None) -> dict[str, str]:
    """Create, on first use, the environments the profile declares and this machine lacks (one pip install
    each, kept in `home()` for later exports and verifies); return {requirement: why} for those that could
    not be created (no network, no wheel for this platform), which export then leaves unchecked."""
    failed = {}
    for text in declared(profile):
        requirement, _, runtime = formats.parse_requirement(text)
        if runtime.engine is None or not _resolve(formats.get(profile.format), text).missing:
            continue
        if announce is not None:
            announce(f"creating the {text} environment in {home()} (once: later exports and verifies reuse it; "
                     f"`hetero runtimes list` shows it)")
        try:
            ensure(text)
        except (RuntimeEnvError, OSError, subprocess.TimeoutExpired) as err:
            failed[text] = " ".join(str(err).split())[:400]
    return failed


def declared(profile) -> list[str]:
    """The runtime requirements a profile promises; a profile that lists none, its verify.runtime here."""
    if profile.runtimes:
        return list(profile.runtimes)
    return [formats.get(profile.format).runtime(profile.verify.runtime).distribution]


def targets(profile, every: bool = False) -> list[Target]:
    """The runtimes an artifact of `profile` is checked on; with `every`, also each other one available here."""
    spec = formats.get(profile.format)
    chosen = [_resolve(spec, text) for text in declared(profile)]
    if every:
        for runtime in spec.runtimes:
            local = installed_version(runtime.distribution) if runtime.adapter else None
            extra = [Target(runtime, local, None, runtime.distribution)] if local else []
            extra += [Target(runtime, e.version, e, f"{e.distribution}=={e.version}") for e in environments()
                      if e.distribution == runtime.distribution and e.problem() is None]
            chosen += [t for t in extra if t.label not in {c.label for c in chosen}]
    return chosen


def describe_environments() -> list[dict]:
    """Rows for `hetero runtimes list`."""
    rows = []
    for env in environments():
        problem = env.problem()
        rows.append({"name": env.name, "package": env.distribution, "version": env.version, "python": env.python,
                     "state": f"broken: {problem}" if problem else "ok", "created": env.created,
                     "create_seconds": env.seconds, "path": str(env.path)})
    return rows

