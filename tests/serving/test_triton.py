"""The Triton model repository generator: configs from the manifest, valid by Triton's own schema,
and broken configs or manifests refused with a clear message before anything is written."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
from tritonclient.grpc import model_config_pb2 as pb

import aim.cli as cli
from aim.errors import AimError, TritonConfigError
from aim.families import get_family, list_families
from aim.files import sha256
from aim.layout import MANIFEST, Manifest, sealed
from aim.serving.triton import CONFIG, check_config, parse_config, read_config, write_model
from tests.conftest import load


def _input(config, name):
    return next(entry for entry in config.input if entry.name == name)


@pytest.mark.parametrize("model", list_families())
def test_config_comes_from_the_engine_and_parses_by_tritons_schema(build_folder, tmp_path, model):
    folder = build_folder(model)
    manifest = json.loads((folder / MANIFEST).read_text())
    export, task, pytorch_model = load(model)  # what the config must say, from the family and its task
    target = write_model(folder, tmp_path / "repo")
    assert target == tmp_path / "repo" / model
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == [model]  # no staging left
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == ["1", "1/model.onnx", CONFIG]
    assert sha256(target / "1" / "model.onnx") == manifest["artifacts"]["engine"]["sha256"]

    config = read_config(target)  # Triton's ModelConfig protobuf, from tritonclient
    assert isinstance(config, pb.ModelConfig)
    profile = next(iter(manifest["profile"].values()))  # the engine's profile: its first input's, batch first
    assert (config.name, config.platform, config.max_batch_size) == (model, "onnxruntime_onnx", profile["max"][0])
    assert [pb.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group] == ["KIND_CPU"]
    assert config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds > 0
    specs = task.input_specs(pytorch_model)  # with the KV cache of a text family
    assert [i.name for i in config.input] == [s.name for s in specs] + ["utility", "focus"]
    for spec in specs:  # model inputs: per-request dims, the batch dim left to Triton
        entry = _input(config, spec.name)
        assert pb.DataType.Name(entry.data_type) == {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}[spec.dtype]
        assert len(entry.dims) == len(spec.dims) - 1 and not entry.HasField("reshape")
        assert all(d == -1 for d, s in zip(entry.dims, spec.dims[1:]) if isinstance(s, str))
    utility, focus = _input(config, "utility"), _input(config, "focus")
    assert list(utility.dims) == [1] and utility.HasField("reshape") and list(utility.reshape.shape) == []
    assert list(focus.dims) == [manifest["modulation"]["num_classes"]] and not focus.HasField("reshape")
    assert not any(entry.optional for entry in config.input)  # TensorRT's backend takes no optional inputs
    rank = len(manifest["graph"]["outputs"][0]["dims"])  # [B, C] or [B, C, H, W] (segmentation, dynamic size)
    assert [(o.name, list(o.dims)) for o in config.output][0] == (
        "logits",
        [manifest["modulation"]["num_classes"]] + [-1] * (rank - 2),
    )
    assert [o.name for o in config.output] == [t["name"] for t in manifest["graph"]["outputs"]]  # present.* too


def test_a_plan_engine_maps_to_tensorrt_plan_on_gpu(build_folder, tmp_path):
    """A manifest whose engine is a TensorRT .plan (as the TensorRT builds write) gives tensorrt_plan,
    KIND_GPU and 1/model.plan. The plan here is a placeholder file: only the config is under test."""
    folder = tmp_path / "resnet"
    shutil.copytree(build_folder("resnet"), folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / "engine.tensorrt.plan").write_bytes(b"placeholder: a serialized TensorRT engine")
    manifest["engine"] = "engine.tensorrt.plan"
    plan = folder / "engine.tensorrt.plan"
    manifest["artifacts"]["tensorrt"] = {"path": plan.name, "bytes": plan.stat().st_size, "sha256": sha256(plan)}
    (folder / MANIFEST).write_text(json.dumps(sealed(manifest)))
    config = read_config(write_model(folder, tmp_path / "repo"))
    assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
    assert [pb.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group] == ["KIND_GPU"]
    assert (tmp_path / "repo" / "resnet" / "1" / "model.plan").read_bytes().startswith(b"placeholder")
    assert (
        list(_input(config, "utility").reshape.shape) == []
        and config.max_batch_size == manifest["dynamic_dims"]["batch"]["max"]
    )
    # the ONNX engine of the same folder still gives the onnxruntime config
    assert (
        read_config(write_model(folder, tmp_path / "repo2", engine="engine.onnxruntime.onnx")).platform
        == "onnxruntime_onnx"
    )


def test_a_real_tensorrt_plan_build_gives_a_tensorrt_plan_model(tmp_path):
    """With TensorRT builds in the pipeline (TensorRT for RTX builds plans on a CPU), the real manifest
    of a .plan engine gives the tensorrt_plan model, and the plan is copied byte for byte."""
    from aim.pipeline.builder import build
    from aim.pipeline.model_source import FamilySource
    from aim.pipeline.request import BuildRequest

    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX (the rtx extra) is not installed")
    manifest = build(
        FamilySource("resnet"), BuildRequest(tmp_path / "build", backend="tensorrt-rtx"), log=lambda line: None
    ).manifest
    folder = tmp_path / "build" / "resnet"
    assert manifest.engine.endswith(".plan")
    target = write_model(folder, tmp_path / "repo")
    config = read_config(target)
    assert config.platform == "tensorrt_plan" and config.max_batch_size == get_family("resnet").dims["batch"].max
    assert [pb.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group] == ["KIND_GPU"]
    assert (target / "1" / "model.plan").read_bytes() == manifest.engine_path().read_bytes()
    assert [i.name for i in config.input] == ["pixel_values", "utility", "focus"]


def _break(config, how):
    if how == "wrong focus dims":
        _input(config, "focus").dims[0] = 7
    elif how == "missing input":
        del config.input[[i.name for i in config.input].index("utility")]
    elif how == "extra input":
        config.input.add(name="temperature", data_type=pb.TYPE_FP32, dims=[1])
    elif how == "max_batch_size 0":
        config.max_batch_size = 0
    elif how == "max_batch_size -3":
        config.max_batch_size = -3
    elif how == "max_batch_size above the profile":
        config.max_batch_size = 1000
    elif how == "wrong data type":
        _input(config, "pixel_values").data_type = pb.TYPE_FP16
    elif how == "optional input":
        _input(config, "focus").optional = True
    elif how == "no reshape":
        _input(config, "utility").ClearField("reshape")
    elif how == "gpu instances for onnx":
        config.instance_group[0].kind = pb.ModelInstanceGroup.KIND_GPU
    elif how == "no dynamic batching":
        config.ClearField("dynamic_batching")
    return config


BROKEN = {
    "wrong focus dims": "'focus' has dims [7]",
    "missing input": "'utility' of the engine is missing",
    "extra input": "'temperature' is not a input",
    "max_batch_size 0": "max_batch_size is 0",
    "max_batch_size -3": "max_batch_size is -3",
    "max_batch_size above the profile": "max_batch_size is 1000",
    "wrong data type": "data_type TYPE_FP16",
    "optional input": "'focus' is optional",
    "no reshape": "'utility' has reshape None",
    "gpu instances for onnx": "KIND_GPU",
    "no dynamic batching": "dynamic_batching is off",
}


@pytest.mark.parametrize("how", sorted(BROKEN))
def test_a_broken_config_is_caught_with_a_clear_message(build_folder, tmp_path, how):
    folder = build_folder("resnet")
    manifest = Manifest.load(folder)
    good = read_config(write_model(folder, tmp_path / "repo"))
    check_config(good, manifest, "engine.onnxruntime.onnx")  # the generated one passes
    broken = _break(copy.deepcopy(good), how)
    from google.protobuf import text_format

    broken = parse_config(text_format.MessageToString(broken))  # still valid by the schema ...
    with pytest.raises(TritonConfigError, match="does not match its engine") as error:
        check_config(broken, manifest, "engine.onnxruntime.onnx")  # ... but not for this engine
    assert BROKEN[how] in str(error.value)


def test_schema_errors_name_line_and_column():
    with pytest.raises(TritonConfigError, match=r"2:1 .*max_batch_sise"):
        parse_config('name: "x"\nmax_batch_sise: 4\n')
    with pytest.raises(TritonConfigError, match=r"TYPE_FLOAT32"):
        parse_config('input { name: "x" data_type: TYPE_FLOAT32 dims: 3 }')


def _edit_manifest(folder, edit):
    manifest = json.loads((folder / MANIFEST).read_text())
    edit(manifest)
    (folder / MANIFEST).write_text(json.dumps(sealed(manifest)))


def _set_focus_dims(manifest, dims):
    manifest["graph"]["inputs"][-1]["dims"] = dims


BROKEN_MANIFESTS = {
    "focus of the wrong width": (lambda m: _set_focus_dims(m, ["batch", 7]), "'focus' must be [batch, 10]"),
    "no utility input": (lambda m: m["graph"]["inputs"].pop(1), "no 'utility' input"),
    "batch not first": (lambda m: _set_focus_dims(m, [10, "batch"]), "Triton batches on the first dim"),
    "unknown dtype": (lambda m: m["graph"]["outputs"][0].update(dtype="complex64"), "'complex64'"),
    "no batch range": (lambda m: m["dynamic_dims"].pop("batch"), "no range for the 'batch' dim"),
    "batch range 0": (lambda m: m["dynamic_dims"]["batch"].update(min=0, opt=0, max=0), "malformed"),
    "engine not modulated": (
        lambda m: m.update(engine="exported.onnx"),
        "exported.onnx does not match its manifest's inputs: 'focus': engine absent",
    ),
    "unknown engine kind": (lambda m: m.update(engine="reference.npz"), "no Triton platform"),
}


@pytest.mark.parametrize("how", sorted(BROKEN_MANIFESTS))
def test_a_broken_manifest_writes_nothing(build_folder, tmp_path, how):
    folder = tmp_path / "resnet"
    shutil.copytree(build_folder("resnet"), folder)
    repo = tmp_path / "repo"
    write_model(folder, repo)
    before = (repo / "resnet" / CONFIG).read_text()
    edit, message = BROKEN_MANIFESTS[how]
    _edit_manifest(folder, edit)
    with pytest.raises(AimError) as error:
        write_model(folder, repo)
    assert message in str(error.value)
    assert sorted(p.name for p in repo.iterdir()) == ["resnet"]  # no staging folder left behind
    assert (repo / "resnet" / CONFIG).read_text() == before  # the previous model is untouched


def test_a_changed_engine_is_refused(build_folder, tmp_path):
    folder = tmp_path / "resnet"
    shutil.copytree(build_folder("resnet"), folder)
    with open(folder / "engine.onnxruntime.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(AimError, match="changed since the build"):
        write_model(folder, tmp_path / "repo")
    assert not (tmp_path / "repo" / "resnet").exists()


def test_cli_writes_the_repository_and_reports_errors(build_folder, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert (
        cli.main(["triton", str(build_folder("resnet")), "--repository", str(repo), "--max-queue-delay-us", "500"]) == 0
    )
    assert 'platform: "onnxruntime_onnx"' in capsys.readouterr().out
    assert read_config(repo / "resnet").dynamic_batching.max_queue_delay_microseconds == 500
    assert cli.main(["triton", str(tmp_path / "nothing"), "--repository", str(repo)]) == 2
    assert "Build one first" in capsys.readouterr().err


@pytest.mark.parametrize("cores, instances, threads", [(1, 1, 1), (2, 2, 1), (6, 4, 1), (8, 4, 2), (32, 4, 8)])
def test_the_cpu_default_uses_the_cores(build_folder, tmp_path, monkeypatch, cores, instances, threads):
    """instances x threads = the cores (up to 4 instances, the rest as threads), whatever the machine."""
    import aim.serving.triton as triton

    monkeypatch.setattr(triton, "cpu_cores", lambda: cores)
    config = read_config(write_model(build_folder("resnet"), tmp_path / "repo"))
    assert [(g.count, pb.ModelInstanceGroup.Kind.Name(g.kind)) for g in config.instance_group] == [
        (instances, "KIND_CPU")
    ]
    assert config.parameters["intra_op_thread_count"].string_value == str(threads)


def test_instances_and_threads_as_asked_and_refused_where_they_make_no_sense(build_folder, tmp_path, capsys):
    folder = build_folder("resnet")
    repo = tmp_path / "repo"
    assert cli.main(["triton", str(folder), "--repository", str(repo), "--instances", "3", "--threads", "5"]) == 0
    config = read_config(repo / "resnet")
    assert [g.count for g in config.instance_group] == [3] and config.parameters[
        "intra_op_thread_count"
    ].string_value == "5"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["triton", str(folder), "--repository", str(repo), "--instances", "0"])
    assert exit_.value.code == 2 and "--instances: must be >= 1" in capsys.readouterr().err
    with pytest.raises(TritonConfigError, match="instances must be at least 1"):
        write_model(folder, repo, instances=0)
    broken = copy.deepcopy(config)
    broken.instance_group[0].count = 0
    with pytest.raises(TritonConfigError, match=r"instance_group count \[0\]"):
        check_config(broken, Manifest.load(folder), "engine.onnxruntime.onnx")


def test_a_plan_runs_one_instance_per_gpu_and_takes_no_cpu_threads(build_folder, tmp_path):
    from aim.serving.triton import instance_plan

    assert instance_plan("KIND_GPU") == (1, None) and instance_plan("KIND_GPU", 2) == (2, None)
    with pytest.raises(TritonConfigError, match="runs on the GPU"):
        instance_plan("KIND_GPU", threads=2)


def test_the_bare_entry_serves_the_bare_model_optimised_like_the_engine(build_folder, tmp_path):
    """--bare: <model>-bare, the model's own inputs and outputs (no utility, focus), the bare graph
    optimised by ONNX Runtime as the build optimised its engine, and the same logits as that graph."""
    import numpy as np
    import onnx

    from aim.runtime.onnxruntime import OnnxRuntimeEngine

    folder = build_folder("resnet")
    manifest = Manifest.load(folder)
    target = write_model(folder, tmp_path / "repo", bare=True, instances=2)
    assert target.name == "resnet-bare"
    config = read_config(target)
    assert [i.name for i in config.input] == ["pixel_values"] and [o.name for o in config.output] == ["logits"]
    assert [g.count for g in config.instance_group] == [2] and config.max_batch_size == manifest.dynamic_dims[
        "batch"
    ].max
    served, graph = target / "1" / "model.onnx", manifest.graph_path("bare")
    nodes = [n.op_type for n in onnx.load(str(served)).graph.node]
    assert not any(op.startswith("RandomUniform") or op.startswith("RandomNormal") for op in nodes)
    assert len(nodes) < len(onnx.load(str(graph)).graph.node)  # fused by ONNX Runtime, like engine.onnxruntime.onnx
    image = {"pixel_values": np.random.default_rng(0).normal(size=(3, 3, 40, 40)).astype(np.float32)}
    assert np.array_equal(
        OnnxRuntimeEngine(served).infer(image)["logits"], OnnxRuntimeEngine(graph).infer(image)["logits"]
    )
    with pytest.raises(TritonConfigError, match="give one of them"):
        write_model(folder, tmp_path / "repo", bare=True, engine="engine.onnxruntime.onnx")
    check_config(config, manifest, "model.onnx", bare=True)
    with pytest.raises(TritonConfigError, match="'utility' of the engine is missing"):
        check_config(config, manifest, "model.onnx")  # the bare entry is no modulated model
