"""`make engine BACKEND=tensorrt-rtx [PRECISION=fp16]`, and how a backend is chosen or refused."""

import json

import pytest

from aim.errors import AimError, InvalidInputError
from aim.files import sha256
from aim.layout import REFERENCE
from aim.pipeline import builder
from aim.pipeline.model_source import FamilySource
from aim.pipeline.report import report
from aim.pipeline.request import BuildRequest
from aim.pipeline.verify import verify_folder
from aim.runtime import tensorrt as trt_engine
from aim.runtime.backends import choose_backend
from aim.verify.reference import Reference

RUNNABLE, WHY_NOT = trt_engine.engine_runnable("tensorrt-rtx")


@pytest.fixture(scope="module")
def rtx_build(tmp_path_factory):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed: pip install -e '.[rtx]'")
    out = tmp_path_factory.mktemp("rtx")
    lines = []
    manifest = builder.build(
        FamilySource("resnet"), BuildRequest(out, backend="tensorrt-rtx", precision="fp16"), log=lines.append
    ).manifest
    return out, manifest, lines


def test_rtx_build_writes_plans_and_records_them(rtx_build):
    out, manifest, lines = rtx_build
    folder = out / "resnet"
    written = json.loads((folder / "manifest.json").read_text())
    assert written["backend"] == "tensorrt-rtx" and written["precision"] == "fp16"
    assert written["engine"] == "engine.tensorrt-rtx.plan"
    assert set(written["tensorrt"]) == {"engine", "engine.bare", "engine.verification"}
    for key, build in written["tensorrt"].items():
        plan = folder / build["path"]
        assert plan.is_file() and build["bytes"] == plan.stat().st_size > 100_000
        assert written["artifacts"][key]["sha256"] == sha256(plan)
        assert 0 < build["build_s"] < 60 and build["version"].startswith("1.7")
    # The profile per input (what the Triton repository reads): the config's DimRanges.
    profile = written["profile"]
    assert profile["pixel_values"] == {"min": [1, 3, 32, 32], "opt": [4, 3, 224, 224], "max": [32, 3, 512, 512]}
    assert profile["utility"] == {"min": [1], "opt": [4], "max": [32]}
    assert profile["focus"]["max"] == [32, written["modulation"]["num_classes"]]
    assert written["tensorrt"]["engine"]["profile"] == profile
    assert all(entry["passed"] for entry in written["compatibility"].values())
    # FP16 graphs are what the engines were built from; graph IO types stay FP32.
    assert written["graphs"] == {
        "bare": "bare.fp16",
        "verification": "verification.fp16",
        "production": "modulated.fp16",
    }
    assert written["artifacts"]["bare.fp16"]["path"] == "exported.fp16.onnx"  # ResNet's bare model is the export
    assert [t["dtype"] for t in written["graph"]["inputs"]] == ["float32"] * 3
    verification = written["verification"]
    assert verification["passed"] and verification["reduced_precision"]["metric"] == "top_k"
    differential = [c for c in verification["checks"] if "PyTorch" in c["name"]]
    assert len(differential) == 2 and all(c["metrics"]["agreement"] >= 0.9 for c in differential)
    text = report(manifest)
    if RUNNABLE:
        assert verification["engine_run"]["ran"] and verification["runner"] == "tensorrt-rtx"
    else:
        assert not verification["engine_run"]["ran"] and "GPU" in verification["engine_run"]["reason"]
        assert verification["runner"] == "onnxruntime"
        assert "engine run SKIPPED" in text and any("cannot run here" in line for line in lines)
    assert "engine.tensorrt-rtx.plan" in text and "MB, built in" in text and "fp16 comparator" in text


def test_rtx_build_rechecks_and_refuses_out_of_profile_input(rtx_build):
    out, manifest, _ = rtx_build
    folder = out / "resnet"
    again = verify_folder(folder)
    assert again.verification.passed
    build = manifest.tensorrt["engine"]
    inputs, outputs = trt_engine.engine_io(manifest.graph)
    engine = trt_engine.TensorRTEngine(folder / build["path"], "tensorrt-rtx", inputs, outputs, manifest.profile)
    feed = Reference.load(folder / REFERENCE).inputs
    small = {"pixel_values": feed["pixel_values"][:, :, :16, :16]}  # below the profile's 32 x 32
    with pytest.raises(InvalidInputError, match=r"outside the range .* min \[1, 3, 32, 32\]"):
        engine.run(small, 0.5, None)


def test_auto_picks_what_the_machine_can_run():
    backend, why = choose_backend("auto")
    gpu, _ = trt_engine.cuda_gpu_available()
    if not gpu:
        assert backend == "onnxruntime" and "auto" in why and "GPU" in why
    else:
        assert backend in ("tensorrt", "onnxruntime") and why.startswith(backend)


def test_tensorrt_backend_that_cannot_work_fails_with_the_reason_and_leaves_nothing(tmp_path, monkeypatch):
    gpu, _ = trt_engine.cuda_gpu_available()
    if gpu:
        monkeypatch.setitem(trt_engine.MODULES, "tensorrt", "tensorrt_not_installed_here")
    with pytest.raises(AimError, match=r"pip install|BACKEND=tensorrt-rtx") as error:
        builder.build(FamilySource("resnet"), BuildRequest(tmp_path / "build", backend="tensorrt"), log=lambda _: None)
    assert "tensorrt" in str(error.value)
    assert not (tmp_path / "build").exists()
    with pytest.raises(AimError, match="unknown backend"):
        builder.build(FamilySource("resnet"), BuildRequest(tmp_path / "build", backend="tensorflow"))
    with pytest.raises(AimError, match="unknown precision"):
        builder.build(FamilySource("resnet"), BuildRequest(tmp_path / "build", precision="int3"))
    assert not (tmp_path / "build").exists()


def test_unsupported_graph_fails_the_tensorrt_build_and_leaves_nothing(tmp_path, monkeypatch):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed")
    from aim.graph_passes import trt_support

    table = dict(trt_support.load_table())
    table["operators"] = {**table["operators"], "Conv": {"supported": False}}  # as if the parser lacked Conv
    monkeypatch.setattr(trt_support, "load_table", lambda *args: table)
    with pytest.raises(
        AimError,
        match=r"(?s)would refuse 12 node.*convolution/Conv' \(Conv\): not supported.*\[bare, verification, "
        r"production\]",
    ):
        builder.build(
            FamilySource("resnet"), BuildRequest(tmp_path / "build", backend="tensorrt-rtx"), log=lambda _: None
        )
    assert not (tmp_path / "build").exists()
