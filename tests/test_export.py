"""Export of the tiny family to every built-in device profile, metadata read back, errors and atomicity."""
from __future__ import annotations

import platform
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hetero import formats
from hetero.errors import ConfigError, ExportError, RuntimeUnavailable
from hetero.export.common import cosine_rows
from hetero.exporter import export_member
from hetero.family import FamilyStore
from hetero.files import sha256_path
from hetero.profiles import all_profiles, builtin_profile_files, load_profile

MEMBER = "edge-a"
PROFILES = sorted(builtin_profile_files())
FORMAT_PACKAGES = {"onnx": "onnxruntime", "tflite": "litert_torch", "coreml": "coremltools",
                   "executorch": "executorch"}


def _installed(profile) -> bool:
    import importlib.util

    return importlib.util.find_spec(FORMAT_PACKAGES[profile.format]) is not None


def export(run_dir: Path, member, profile, **options):
    store = FamilyStore.open(run_dir)
    with store.lock("export"):
        return export_member(store, member, profile, **options)


def open_runtime(path: Path, format: str, runtime: str):
    return formats.get(format).open(path, runtime)


@pytest.fixture(scope="module")
def exported(tiny_family_dir, tmp_path_factory, runtime_environments):
    """One copy of the tiny family with MEMBER exported to every profile whose converter is installed."""
    run_dir = tmp_path_factory.mktemp("exported") / "family"
    shutil.copytree(tiny_family_dir, run_dir)
    artifacts = {}
    for profile in all_profiles():
        if _installed(profile):
            artifacts[profile.name] = export(run_dir, MEMBER, profile)
    return run_dir, artifacts


def _held_out(run_dir: Path, size: int, count: int = 64) -> torch.Tensor:
    from hetero.models import resize_to

    test = FamilyStore.open(run_dir).split().test
    index = torch.linspace(0, len(test) - 1, count).long()
    return resize_to(test.images[index].float() / 255.0, size)


def _metadata(path: Path, profile) -> dict:
    try:
        return open_runtime(path, profile.format, profile.verify.runtime).metadata
    except RuntimeUnavailable:  # CoreML off macOS: the spec still carries the metadata
        from hetero.export.coreml import read_coreml_metadata

        return read_coreml_metadata(path)


@pytest.mark.slow
@pytest.mark.parametrize("name", PROFILES)
def test_export_every_profile_registers_file_with_metadata_and_parity(exported, name):
    run_dir, artifacts = exported
    profile = load_profile(name)
    if name not in artifacts:
        pytest.skip(f"converter for {profile.format} not installed")
    artifact = artifacts[name]
    store = FamilyStore.open(run_dir)
    entry = store.member(MEMBER)
    path = run_dir / artifact.file

    assert store.artifacts(name) == [artifact]
    assert artifact.sha256 == sha256_path(path)
    assert path.suffix == profile.suffix and not list(path.parent.glob(".hetero-tmp.*"))  # no temp left behind

    metadata = _metadata(path, profile)
    expected = {"space_id": store.space_id, "family": store.name, "family_version": store.manifest.version,
                "member": MEMBER, "embedding_dim": entry.dim, "input_size": entry.input_size,
                "layout": profile.layout, "mean": entry.mean, "std": entry.std, "precision": profile.precision,
                "profile": name}
    assert {k: metadata[k] for k in expected} == expected
    assert metadata["quantization"] == artifact.quantization
    assert metadata["preprocessing"]["transparency"] == "composited onto RGB [255, 255, 255]"

    try:
        runtime = open_runtime(path, profile.format, profile.verify.runtime)
    except RuntimeUnavailable as err:
        assert platform.system() != "Darwin" and "macOS" in str(err)
        return
    images = _held_out(run_dir, entry.input_size)
    with torch.no_grad():
        reference = store.load_member(MEMBER)(images).numpy()
    cosine = cosine_rows(runtime.embed(images.numpy()), reference)
    assert cosine.min() >= profile.tolerances.min_cosine, (name, cosine.min())


@pytest.mark.slow
def test_coreml_spec_shows_weight_precision_and_deployment_target(exported):
    pytest.importorskip("coremltools")
    from hetero.export.coreml import inspect_artifact

    run_dir, artifacts = exported
    fp16 = inspect_artifact(run_dir / artifacts["iphone-coreml-fp16"].file)
    int8 = inspect_artifact(run_dir / artifacts["iphone-coreml-int8"].file)
    size = fp16["metadata"]["input_size"]
    assert fp16["inputs"] == {"images": [1, 3, size, size]} and fp16["outputs"]["embedding"][-1] == 32
    assert max(fp16["weight_dtypes"], key=fp16["weight_dtypes"].get) == "FLOAT16"
    assert max(int8["weight_dtypes"], key=int8["weight_dtypes"].get) == "INT8"
    assert fp16["metadata"]["minimum_deployment_target"] == "iOS16"


@pytest.mark.slow
def test_int8_artifacts_record_scheme_and_calibration_on_training_images(exported):
    run_dir, artifacts = exported
    for name in ("rpi-onnx-int8", "android-litert-int8"):
        if name not in artifacts:
            continue
        quantization = artifacts[name].quantization
        assert quantization["scheme"] in ("static-int8-qdq", "static-int8", "int8-dynamic", "int8-weights")
        assert quantization["parity_check"]["min_cosine"] >= load_profile(name).tolerances.min_cosine
        if quantization["scheme"].startswith("static"):
            assert quantization["calibration_images"] > 0
            assert "training split" in quantization["calibration_source"]


def test_calibration_images_come_from_training_classes_only(tiny_family_dir):
    from hetero.exporter import calibration_images

    store = FamilyStore.open(tiny_family_dir)
    images = calibration_images(store, 24, 40)
    split = store.split()
    assert images.shape == (40, 3, 24, 24) and 0 <= images.min() and images.max() <= 1
    train = split.train.images.float() / 255.0
    full = calibration_images(store, store.config().load_size, 10_000)
    assert len(full) == len(split.train)  # never more than the training split, never a test image
    assert torch.equal(full, train)


# -------------------------------------------------------------------------------- ONNX schemes (fast)


def _profile_file(tmp_path: Path, base: str, **changes) -> str:
    import yaml

    data = yaml.safe_load(builtin_profile_files()[base].read_text())
    data.pop("runtimes", None)  # this runtime only: no isolated environment needed
    for dotted, value in changes.items():
        keys = dotted.split("__")
        node = data
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_onnx_int8_falls_back_to_weight_only_when_static_misses_the_tolerance(family_copy, tmp_path):
    profile = load_profile(_profile_file(tmp_path, "rpi-onnx-int8", name="strict-int8",
                                         tolerances__min_cosine=0.9999999, calibration_images=64))
    artifact = export(family_copy, MEMBER, profile)
    quantization = artifact.quantization
    assert quantization["scheme"] == "int8-weights"
    assert quantization["fallback_from"] == "static-int8-qdq"
    assert "tolerance 0.9999999" in quantization["fallback_reason"]
    metadata = open_runtime(family_copy / artifact.file, "onnx", "onnxruntime").metadata
    assert metadata["quantization"]["scheme"] == "int8-weights"
    import onnx

    graph = onnx.load(str(family_copy / artifact.file)).graph
    assert any(n.op_type == "DequantizeLinear" for n in graph.node)
    assert any(i.data_type == onnx.TensorProto.INT8 for i in graph.initializer)


def test_onnx_fp16_keeps_float_io_and_parity(family_copy, tmp_path):
    profile = load_profile(_profile_file(tmp_path, "server-onnx-fp32", name="onnx-fp16", precision="fp16"))
    artifact = export(family_copy, MEMBER, profile)
    runtime = open_runtime(family_copy / artifact.file, "onnx", "onnxruntime")
    images = _held_out(family_copy, 32, 32)
    with torch.no_grad():
        reference = FamilyStore.open(family_copy).load_member(MEMBER)(images).numpy()
    out = runtime.embed(images.numpy())
    assert out.dtype == np.float32 and cosine_rows(out, reference).min() >= 0.999
    assert runtime.batch == 0  # dynamic batch kept


def test_a_profile_file_is_kept_in_the_family_for_later_verifies(family_copy, tmp_path, capsys):
    """Exported for a profile file that is then moved away, the family still verifies, plainly and as a plugin."""
    from hetero.cli import main
    from hetero.family.outputs import family_files
    from hetero.verify import artifact_profile, planned_runs, verify

    given = Path(_profile_file(tmp_path, "server-onnx-fp32", name="my-board", budgets__max_params=10_000_000))
    assert main(["export", str(family_copy), "--profile", str(given), "--member", MEMBER]) == 0
    given.unlink()
    store = FamilyStore.open(family_copy)
    (artifact,) = store.artifacts("my-board")
    assert artifact.profile_file == "exports/my-board/profile.yaml"
    report, _ = verify(store, write=False, latency_runs=2)
    (result,) = [a for a in report["artifacts"] if a["profile"] == "my-board"]
    assert {c["status"] for c in result["checks"]} <= {"pass", "skip"}, result["checks"]
    kept = artifact_profile(artifact, family_copy, {}, str(family_copy))
    assert (kept.name, kept.budgets.max_params) == ("my-board", 10_000_000)
    assert planned_runs([artifact], lambda a: artifact_profile(a, family_copy, {}, str(family_copy)))[0][1] == kept
    assert family_copy / artifact.profile_file in family_files(family_copy)  # --overwrite removes the copy too
    builtin = export(family_copy, MEMBER, load_profile("server-onnx-fp32"))
    assert builtin.profile_file is None and not (family_copy / "exports/server-onnx-fp32/profile.yaml").exists()


def test_member_is_chosen_automatically_within_budget(family_copy):
    artifact = export(family_copy, None, load_profile("server-onnx-fp32"))
    assert artifact.member in [m.name for m in FamilyStore.open(family_copy).edges]


# ------------------------------------------------------------------------------------------ bad input


def test_budget_refusal_names_member_profile_and_figure(family_copy, tmp_path):
    profile = load_profile(_profile_file(tmp_path, "rpi-onnx-int8", name="tiny-board", budgets__max_params=1000))
    with pytest.raises(ExportError) as err:
        export(family_copy, MEMBER, profile)
    message = str(err.value)
    assert "'tiny-board'" in message and "params" in message and "budget 1,000" in message
    assert not (family_copy / "exports" / "tiny-board").exists() or not any((family_copy / "exports" /
                                                                            "tiny-board").iterdir())
    assert not FamilyStore.open(family_copy).artifacts()


def test_file_size_budget_is_checked_after_conversion(family_copy, tmp_path):
    profile = load_profile(_profile_file(tmp_path, "server-onnx-fp32", name="small-file", budgets__max_file_mb=0.01))
    with pytest.raises(ExportError, match=r"file size .* MB > budget 0.01 MB"):
        export(family_copy, MEMBER, profile)
    assert not list((family_copy / "exports" / "small-file").iterdir())
    assert not FamilyStore.open(family_copy).artifacts()


def test_unknown_profile_suggests_the_closest():
    with pytest.raises(ConfigError) as err:
        load_profile("iphone-coreml-fp61")
    assert "'iphone-coreml-fp61'" in str(err.value) and "did you mean 'iphone-coreml-fp16'" in str(err.value)


@pytest.mark.parametrize("change, words", [
    ({"precison": "fp16"}, ["precison"]),
    ({"precision": "int4"}, ["precision", "int4"]),
    ({"layout": "NWHC"}, ["layout"]),
    # What no exporter or runtime can do is refused when the profile is loaded (the format registry decides):
    ({"format": "executorch", "precision": "int8", "verify": {"runtime": "executorch"}, "runtimes": []},
     ["precision: 'int8' cannot be produced by the executorch exporter; allowed: fp32"]),
    ({"verify": {"runtime": "tflite_runtime"}}, ["verify: runtime 'tflite_runtime' has no adapter for 'tflite' files"]),
    ({"batch": 0}, ["batch: the tflite exporter needs a fixed batch size"]),
    ({"format": "coreml", "precision": "int8", "runtimes": []},
     ["precision: 'int8' cannot be produced by the coreml exporter"]),
])
def test_profile_file_with_a_wrong_field_names_file_and_field(tmp_path, change, words):
    import yaml

    data = yaml.safe_load(builtin_profile_files()["android-litert-fp16"].read_text())
    data.update(change)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_profile(str(path))
    assert str(path) in str(err.value) and all(w in str(err.value) for w in words)


def test_missing_converter_names_the_extra_to_install(family_copy, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "coremltools" else real(name, *a, **k))
    with pytest.raises(ExportError) as err:
        export(family_copy, MEMBER, load_profile("iphone-coreml-fp16"))
    assert "coremltools" in str(err.value) and "pip install 'hetero[coreml]'" in str(err.value)
    assert "iphone-coreml-fp16" in str(err.value)


def test_converter_failing_on_an_op_is_one_paragraph_and_leaves_nothing(family_copy, monkeypatch):
    import hetero.export.onnx as onnx_module

    def broken(model, path, profile, metadata, calibration=None, accept=None):
        path.write_bytes(b"half a model")  # a converter that dies mid-write
        raise RuntimeError("Exporting the operator 'aten::weird_op' to ONNX opset 17 is not supported.\n"
                           "Please open an issue.")

    monkeypatch.setattr(onnx_module, "export_onnx", broken)
    with pytest.raises(ExportError) as err:
        export(family_copy, MEMBER, load_profile("server-onnx-fp32"))
    message = str(err.value)
    assert "\n" not in message and "aten::weird_op" in message and "'server-onnx-fp32'" in message
    assert list((family_copy / "exports" / "server-onnx-fp32").iterdir()) == []
    assert not FamilyStore.open(family_copy).artifacts()


def test_interrupted_export_leaves_no_artifact_and_keeps_the_previous_one(family_copy, monkeypatch):
    profile = load_profile("server-onnx-fp32")
    first = export(family_copy, MEMBER, profile)
    path = family_copy / first.file
    before = path.read_bytes()
    import hetero.export.onnx as onnx_module

    def interrupted(model, path, profile, metadata, calibration=None, accept=None):
        path.write_bytes(b"partial")
        raise KeyboardInterrupt  # Ctrl-C in the middle of a conversion

    monkeypatch.setattr(onnx_module, "export_onnx", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export(family_copy, MEMBER, profile)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file or folder left
    assert FamilyStore.open(family_copy).artifacts() == [first]


def test_directory_artifacts_hash_deterministically(tmp_path):
    def tree(root: Path, order):
        for name in order:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(name * 3)
        return root

    a = tree(tmp_path / "a.mlpackage", ["Manifest.json", "Data/weights/weight.bin", "Data/model.mlmodel"])
    b = tree(tmp_path / "b.mlpackage", ["Data/model.mlmodel", "Data/weights/weight.bin", "Manifest.json"])
    assert sha256_path(a) == sha256_path(b)
    (b / "Data/weights/weight.bin").write_text("tampered")
    assert sha256_path(a) != sha256_path(b)


def test_every_builtin_profile_has_a_registered_format():
    for profile in all_profiles():
        runtimes = [r.name for r in formats.get(profile.format).in_process()]
        assert profile.format in formats.FORMATS and profile.verify.runtime in runtimes
    kinds = {(p.format, p.precision) for p in all_profiles()}
    assert {("coreml", "fp16"), ("coreml", "int8-weights"), ("tflite", "fp16"), ("tflite", "int8"),
            ("onnx", "int8"), ("onnx", "fp32")} <= kinds
    assert load_profile("iphone-coreml-fp16").minimum_deployment_target


def test_the_registry_is_the_one_source_of_suffixes_and_runtimes():
    for spec in formats.FORMATS.values():
        module = spec.module() if not spec.missing_packages() else None
        if module is None:
            continue
        assert callable(getattr(module, spec.exporter)) and callable(getattr(module, spec.metadata_reader))
        assert all(isinstance(getattr(module, r.adapter), type) for r in spec.runtimes if r.adapter)
    assert formats.for_path("x/model.mlpackage").name == "coreml" and formats.for_path("a.bin") is None
