"""TensorRT engines. On CPU, TensorRT for RTX builds real plans (its builder needs no GPU): every family,
bare and modulated, FP32 and FP16, with the profiles from the configs. Running a plan needs a GPU:
those tests are skipped with the reason where there is none."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from aim.contract import FOCUS, NOISE_INPUTS, PREFIX, UTILITY
from aim.errors import InvalidGraphError, InvalidInputError
from aim.graph_passes.fp16 import convert_to_fp16
from aim.layout import GraphIO, Tensor
from aim.pipeline.engine_runs import run_engines
from aim.runtime import tensorrt as trt_engine
from aim.runtime.base import check_profile, profile_from_io
from aim.runtime.onnxruntime import OnnxRuntimeEngine
from aim.verify.judges import judge
from aim.verify.statistics import statistical_plan

BACKEND = "tensorrt-rtx"
RUNNABLE, WHY_NOT = trt_engine.engine_runnable(BACKEND)
needs_gpu = pytest.mark.skipif(not RUNNABLE, reason=f"running a TensorRT engine needs an NVIDIA GPU: {WHY_NOT}")


def dims_of(family):
    return {name: {"min": r.min, "opt": r.opt, "max": r.max} for name, r in family.family.dims.items()}


@pytest.mark.parametrize("kind", ["production", "verification"])
def test_profile_follows_the_config(family, kind):
    """utility [B] and focus [B, C] follow the batch range; model inputs and the noise inputs follow
    the config's dims (the noise like the logits: batch, classes and, for SegFormer, the input's height
    and width after upsampling)."""
    inputs = GraphIO.of(family.path(kind)).inputs
    profile = profile_from_io(inputs, dims_of(family))
    classes = [t for t in inputs if t.name == FOCUS][0].dims[1]
    batch = family.family.dims["batch"]
    for key in ("min", "opt", "max"):
        assert profile[UTILITY][key] == [getattr(batch, key)]
        assert profile[FOCUS][key] == [getattr(batch, key), classes]
        for spec in family.task.input_specs(family.model):
            want = [getattr(family.family.dims[d], key) if isinstance(d, str) else None for d in spec.dims]
            got = profile[spec.name][key]
            assert all(w is None or w == g for w, g in zip(want, got)) and len(got) == len(want)
    if kind == "verification":
        for name in NOISE_INPUTS:
            logits_dims = [batch.max, classes] + (
                [family.family.dims["height"].max, family.family.dims["width"].max]
                if family.task.upsample_logits_to
                else []
            )
            assert profile[name]["max"] == logits_dims


def test_profile_needs_a_range_for_every_dynamic_dim():
    with pytest.raises(InvalidGraphError, match="past_sequence"):
        profile_from_io(
            [Tensor("past_key", "float32", ["batch", 2, "past_sequence", 16])],
            {"batch": {"min": 1, "opt": 2, "max": 4}},
        )


def test_shapes_outside_the_profile_are_refused_before_running():
    profile = {"x": {"min": [1, 3], "opt": [2, 3], "max": [4, 3]}}
    check_profile({"x": np.zeros((4, 3))}, profile)
    with pytest.raises(InvalidInputError, match=r"shape \[5, 3\], outside the range.*min \[1, 3\], max \[4, 3\]"):
        check_profile({"x": np.zeros((5, 3))}, profile)


def test_missing_backend_says_what_to_install(monkeypatch):
    monkeypatch.setitem(trt_engine.MODULES, "tensorrt", "tensorrt_not_installed_here")
    with pytest.raises(trt_engine.BackendUnavailableError, match=r"pip install -e '\.\[gpu\]'"):
        trt_engine.import_api("tensorrt")


# ---------------------------------------------------------------------------------------------
# Builds with TensorRT for RTX (CPU is enough).


@pytest.fixture(scope="module")
def plans(family, tmp_path_factory):
    """Plans of the bare and production graphs in FP32 and FP16, built once per family."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed: pip install -e '.[rtx]'")
    folder = tmp_path_factory.mktemp(f"{family.name}_plans")
    built = {}
    for kind in ("bare", "production"):
        for precision in ("fp32", "fp16"):
            source = family.path(kind)
            if precision == "fp16":
                source = folder / f"{kind}.fp16.onnx"
                onnx.save(convert_to_fp16(onnx.load(str(family.path(kind))), family.family.fp16_keep_fp32), str(source))
            profile = profile_from_io(GraphIO.of(source).inputs, dims_of(family))
            built[kind, precision] = (
                source,
                trt_engine.build_engine(source, folder / f"{kind}.{precision}.plan", BACKEND, profile),
            )
    return built


@pytest.mark.parametrize("kind", ["bare", "production"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_builds_with_the_config_profile(family, plans, kind, precision):
    source, result = plans[kind, precision]
    assert result.path.is_file() and result.bytes == result.path.stat().st_size > 100_000
    assert 0 < result.seconds < 120 and result.version.startswith("1.")
    assert not list(result.path.parent.glob(".*tmp*"))  # written atomically, nothing left beside it
    batch = family.family.dims["batch"]
    for spec in family.task.input_specs(family.model):
        shapes = result.profile[spec.name]
        assert shapes["min"][0] == batch.min and shapes["max"][0] == batch.max
    # Strongly typed: the graph's IO types are the network's, FP32 at the interface in both precisions.
    integer = {t.name for t in GraphIO.of(source).inputs if t.dtype.startswith("int")}  # token ids, masks, positions
    assert {name: io["dtype"] for name, io in result.io_types.items() if name not in integer} == {
        name: "FLOAT" for name in result.io_types if name not in integer
    }
    assert all(result.io_types[name]["dtype"] == "INT64" for name in integer)
    assert result.as_dict()["strongly_typed"] and result.as_dict()["workspace_bytes"] == trt_engine.WORKSPACE_BYTES


def test_fp16_engine_keeps_the_redistribution_fp32(family, plans):
    """The parsed network (strongly typed) computes the redistribution layers in FP32 and the model in FP16."""
    source, _ = plans["production", "fp16"]
    *_, network, parser, _ = trt_engine.parse_network(source, BACKEND)
    _, layers = trt_engine.network_summary(network)
    region = {name: types for name, types in layers.items() if name.startswith(PREFIX)}
    assert region and all(types <= {"FLOAT", "INT64", "INT32", "BOOL"} for types in region.values()), region
    floating = [types for name, types in layers.items() if types & {"FLOAT", "HALF"} and not name.startswith(PREFIX)]
    assert sum("HALF" in types for types in floating) > 0.7 * len(floating)  # the model computes in FP16
    fp32_source, _ = plans["production", "fp32"]
    _, fp32_layers = trt_engine.network_summary(trt_engine.parse_network(fp32_source, BACKEND)[2])
    assert not any("HALF" in types for types in fp32_layers.values())


def test_engine_reads_profile_back_where_it_can(plans):
    """Deserializing needs a GPU; without one the engine cannot be read back, and says so (None)."""
    _, result = plans["production", "fp32"]
    profile = trt_engine.read_profile(result.path, BACKEND)
    if RUNNABLE:
        assert profile == result.profile
    else:
        assert profile is None


def test_runner_refuses_out_of_profile_shapes_on_any_machine(family, plans):
    source, result = plans["production", "fp32"]
    inputs, outputs = trt_engine.engine_io(GraphIO.of(source))
    engine = trt_engine.TensorRTEngine(result.path, BACKEND, inputs, outputs, result.profile)
    reference = family.reference(seed=0)
    feed = reference.inputs
    too_big = {
        name: np.concatenate([array] * (family.family.dims["batch"].max // array.shape[0] + 1))
        for name, array in feed.items()
    }
    with pytest.raises(InvalidInputError, match="outside the range"):
        engine.run(too_big, 0.0, None)
    if not RUNNABLE:
        with pytest.raises(trt_engine.BackendUnavailableError, match="cannot run"):
            engine.run(feed, 0.0, None)


# ---------------------------------------------------------------------------------------------
# On a GPU: the engines run and are verified against PyTorch.


@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gpu_engine_verifies_against_pytorch(family, plans, tmp_path, precision):
    verification = family.path("verification")
    if precision == "fp16":
        verification = tmp_path / "verification.fp16.onnx"
        onnx.save(
            convert_to_fp16(onnx.load(str(family.path("verification"))), family.family.fp16_keep_fp32),
            str(verification),
        )
    profile = profile_from_io(GraphIO.of(verification).inputs, dims_of(family))
    verify_plan = trt_engine.build_engine(verification, tmp_path / "verify.plan", BACKEND, profile)
    runners = []
    for source, result in (plans["bare", precision], (verification, verify_plan), plans["production", precision]):
        inputs, outputs = trt_engine.engine_io(GraphIO.of(source))
        runners.append(trt_engine.TensorRTEngine(result.path, BACKEND, inputs, outputs, result.profile))
    reference = family.reference(seed=0)
    axis = family.task.class_axis
    results = run_engines(
        *runners, reference, lambda bare: statistical_plan(bare.shape, axis), family.family.dims["batch"].max
    )
    checks = judge(
        results, reference, family.family.tolerance, axis, 0, family.family.fp16 if precision == "fp16" else None
    )
    assert all(c.passed for c in checks), [c.as_dict() for c in checks if not c.passed]


@needs_gpu
def test_gpu_engine_runs_at_profile_min_opt_max(family, plans):
    source, result = plans["production", "fp32"]
    inputs, outputs = trt_engine.engine_io(GraphIO.of(source))
    engine = trt_engine.TensorRTEngine(result.path, BACKEND, inputs, outputs, result.profile)
    bare = OnnxRuntimeEngine(family.path("bare"))
    for key in ("min", "opt", "max"):
        sizes = {name: getattr(r, key) for name, r in family.family.dims.items()}
        if family.task.upsample_logits_to and key == "max":
            sizes["batch"] = 1  # the full max is 5 GiB per logits tensor; the spatial max is what matters
        feed = {k: v.numpy() for k, v in family.inputs(**sizes).items()}
        out = engine.run(feed, 0.0, None)
        np.testing.assert_allclose(
            out, bare.run(feed), atol=family.family.tolerance.atol * 10, rtol=family.family.tolerance.rtol * 10
        )
