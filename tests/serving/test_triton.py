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
from aim.layout import FILES, MANIFEST, Manifest, sealed
from aim.serving.config import CONFIG, check_config, parse_config, read_config
from aim.serving.front import FrontSpec
from aim.serving.triton import write_model
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
    # the engine's external weights (every build keeps them in one file: docs/real-sizes.md) beside it
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == [
        "1",
        "1/exported.onnx.data",
        "1/front.json",
        "1/model.onnx",
        "1/model.py",
        CONFIG,
    ]
    assert sha256(target / "1" / "model.onnx") == manifest["artifacts"]["engine"]["sha256"]
    assert "from aim.serving.front import TritonPythonModel" in (target / "1" / "model.py").read_text()

    config = read_config(target)  # Triton's ModelConfig protobuf, from tritonclient
    assert isinstance(config, pb.ModelConfig)
    profile = next(iter(manifest["profile"].values()))  # the engine's profile: its first input's, batch first
    assert (config.name, config.backend, config.platform, config.max_batch_size) == (
        model,
        "python",  # the front (aim/serving/front.py) holds the engine
        "",
        profile["max"][0],
    )
    assert [pb.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group] == ["KIND_CPU"]
    assert config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds > 0
    specs = task.input_specs(pytorch_model)  # with the KV cache of a text family
    assert [i.name for i in config.input] == [s.name for s in specs] + ["utility", "focus"]
    for spec in specs:  # model inputs: per-request dims, the batch dim left to Triton
        entry = _input(config, spec.name)
        assert pb.DataType.Name(entry.data_type) == {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}[spec.dtype]
        assert len(entry.dims) == len(spec.dims) - 1 and not entry.optional
        assert all(d == -1 for d, s in zip(entry.dims, spec.dims[1:]) if isinstance(s, str))
    utility, focus = _input(config, "utility"), _input(config, "focus")
    assert list(utility.dims) == [1] and not utility.optional  # one sigma per sample
    assert list(focus.dims) == [manifest["modulation"]["num_classes"]] and focus.optional  # absent = no focus
    spec = FrontSpec.load(target / "1")
    assert (spec.role, spec.engine, spec.backend, spec.tiered) == ("modulated", "model.onnx", "onnxruntime", False)
    assert spec.profile == manifest["profile"]  # the build's range: a request outside it is refused
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
    assert config.backend == "python" and "intra_op_thread_count" not in config.parameters
    assert [pb.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group] == ["KIND_GPU"]
    assert (tmp_path / "repo" / "resnet" / "1" / "model.plan").read_bytes().startswith(b"placeholder")
    spec = FrontSpec.load(tmp_path / "repo" / "resnet" / "1")
    assert (spec.engine, spec.backend) == ("model.plan", "tensorrt")  # the front runs it with TensorRT
    assert config.max_batch_size == manifest["dynamic_dims"]["batch"]["max"]
    # the ONNX engine of the same folder still gives the CPU entry
    other = write_model(folder, tmp_path / "repo2", engine="engine.onnxruntime.onnx")
    assert [pb.ModelInstanceGroup.Kind.Name(g.kind) for g in read_config(other).instance_group] == ["KIND_CPU"]
    assert FrontSpec.load(other / "1").backend == "onnxruntime"


@pytest.fixture(scope="module")
def rtx_build(tmp_path_factory):
    """A TensorRT for RTX build of resnet (plans build on a CPU; running them needs an RTX GPU)."""
    from aim.pipeline.builder import build
    from aim.pipeline.model_source import FamilySource
    from aim.pipeline.request import BuildRequest

    pytest.importorskip("tensorrt_rtx", reason="TensorRT for RTX (the rtx extra) is not installed")
    root = tmp_path_factory.mktemp("rtx")
    request = BuildRequest(root / "build", backend="tensorrt-rtx")
    return build(FamilySource("resnet"), request, log=lambda line: None).manifest


def test_a_real_tensorrt_plan_build_gives_a_gpu_model(rtx_build, tmp_path):
    """With TensorRT builds in the pipeline (TensorRT for RTX builds plans on a CPU), the real manifest
    of a .plan engine gives a KIND_GPU front, and the plan is copied byte for byte."""
    manifest = rtx_build
    assert manifest.engine.endswith(".plan")
    target = write_model(manifest.folder, tmp_path / "repo")
    config = read_config(target)
    assert config.backend == "python" and config.max_batch_size == get_family("resnet").dims["batch"].max
    assert [pb.ModelInstanceGroup.Kind.Name(g.kind) for g in config.instance_group] == ["KIND_GPU"]
    assert (target / "1" / "model.plan").read_bytes() == manifest.engine_path().read_bytes()
    assert [i.name for i in config.input] == ["pixel_values", "utility", "focus"]
    assert FrontSpec.load(target / "1").backend == "tensorrt-rtx"  # run where TensorRT for RTX runs it


def test_the_tiered_front_runs_the_tensorrt_plan_where_its_gpu_is(rtx_build, tmp_path):
    """On a GPU the front holds the TensorRT plan (through the runner `aim run` uses): the premium key
    gets the bare plan's logits, no key the default tier's noise. Needs the plan's GPU (an RTX GPU for
    a TensorRT for RTX plan); elsewhere the front refuses to load, saying why, and the test is skipped."""
    import numpy as np

    from aim.runtime.folder import Build
    from aim.runtime.tensorrt import BackendUnavailableError, engine_runnable
    from aim.serving.front import Front
    from aim.serving.tiers import key_digest

    key = "aim_" + "k" * 43
    tiers = _tiers(tmp_path / "tiers.json", {key_digest(key): "premium"})
    target = write_model(rtx_build.folder, tmp_path / "repo", tiers=tiers)
    runnable, why = engine_runnable("tensorrt-rtx")
    if not runnable:
        with pytest.raises(BackendUnavailableError, match="cannot run model.plan here"):
            Front(target / "1")
        pytest.skip(f"the TensorRT for RTX plan needs an RTX GPU to run: {why}")
    front = Front(target / "1")
    image = {"pixel_values": np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)}
    premium = front.run([front.feed(image, {"authorization": f"Bearer {key}"})])[0]["logits"]
    bare = Build(rtx_build).runner("bare", "tensorrt-rtx")
    np.testing.assert_array_equal(premium, bare.infer(image)["logits"])
    free = front.run([front.feed(image, {})])[0]["logits"]
    from tests.serving.test_tiered_server import noise_matches

    assert noise_matches(free, premium, 3.0)  # the default tier's sigma (a chi-square check at 1e-9)


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
    elif how == "optional utility":
        _input(config, "utility").optional = True
    elif how == "required focus":
        _input(config, "focus").optional = False
    elif how == "a platform":
        config.platform = "onnxruntime_onnx"
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
    "optional utility": "input 'utility' is optional",
    "required focus": "input 'focus' is not optional",
    "a platform": "the front needs 'python'",
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
    "unknown engine kind": (lambda m: m.update(engine="reference.npz"), "no Triton model for engine"),
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
    assert 'backend: "python"' in capsys.readouterr().out
    assert read_config(repo / "resnet").dynamic_batching.max_queue_delay_microseconds == 500
    assert cli.main(["triton", str(tmp_path / "nothing"), "--repository", str(repo)]) == 2
    assert "Build one first" in capsys.readouterr().err


@pytest.mark.parametrize("cores, instances, threads", [(1, 1, 1), (2, 2, 1), (6, 4, 1), (8, 4, 2), (32, 4, 8)])
def test_the_cpu_default_uses_the_cores(build_folder, tmp_path, monkeypatch, cores, instances, threads):
    """instances x threads = the cores (up to 4 instances, the rest as threads), whatever the machine."""
    import aim.serving.config as config_module

    monkeypatch.setattr(config_module, "cpu_cores", lambda: cores)
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
    from aim.serving.config import instance_plan

    assert instance_plan("KIND_GPU") == (1, None) and instance_plan("KIND_GPU", 2) == (2, None)
    with pytest.raises(TritonConfigError, match="runs on the GPU"):
        instance_plan("KIND_GPU", threads=2)


def test_the_bare_entry_serves_the_bare_model_optimised_like_the_engine(build_folder, tmp_path):
    """--bare: <model>-bare, the model's own inputs and outputs (no utility, focus), the bare graph
    served as the build serves its engine (a graph with external weights is its own engine: no
    optimised copy of the weights), and the same logits as that graph."""
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
    assert served.read_bytes() == graph.read_bytes()  # like engine.onnxruntime.onnx: the graph itself
    assert [p.name for p in (target / "1").glob("*.data")] == [FILES["weights"]]  # its weights, one copy
    image = {"pixel_values": np.random.default_rng(0).normal(size=(3, 3, 40, 40)).astype(np.float32)}
    assert np.array_equal(
        OnnxRuntimeEngine(served).infer(image)["logits"], OnnxRuntimeEngine(graph).infer(image)["logits"]
    )
    with pytest.raises(TritonConfigError, match="give one of them"):
        write_model(folder, tmp_path / "repo", bare=True, engine="engine.onnxruntime.onnx")
    check_config(config, manifest, "model.onnx", role="bare")
    assert FrontSpec.load(target / "1").role == "bare"
    with pytest.raises(TritonConfigError, match="'utility' of the engine is missing"):
        check_config(config, manifest, "model.onnx")  # the bare entry is no modulated model


def _tiers(path, keys=None):
    path.write_text(
        json.dumps(
            {
                "default": "free",
                "tiers": {"free": {"utility": 3.0}, "premium": {"utility": 0.0}},
                "keys": keys or {"sha256:" + "ab" * 32: "premium"},
            }
        )
    )
    return path


def test_a_tiered_entry_takes_no_utility_and_carries_the_tier_table_without_keys(build_folder, tmp_path):
    tiers = _tiers(tmp_path / "tiers.json")
    target = write_model(build_folder("resnet"), tmp_path / "repo", tiers=tiers)
    config = read_config(target)
    assert [(i.name, i.optional) for i in config.input] == [("pixel_values", False), ("focus", True)]
    assert FrontSpec.load(target / "1").tiered
    assert json.loads((target / "1" / "tiers.json").read_text()) == json.loads(tiers.read_text())
    manifest = Manifest.load(build_folder("resnet"))
    check_config(config, manifest, "model.onnx", tiered=True)
    with_utility = copy.deepcopy(config)
    with_utility.input.add(name="utility", data_type=pb.TYPE_FP32, dims=[1])
    with pytest.raises(TritonConfigError, match="a tiered model takes no 'utility'"):
        check_config(with_utility, manifest, "model.onnx", tiered=True)


def test_a_repository_is_tiered_as_a_whole(build_folder, tmp_path, capsys):
    """A tiered entry beside one that takes utility (or serves the bare model) would protect nothing:
    any client would call the other. Each way round is refused, and nothing is written."""
    tiers = _tiers(tmp_path / "tiers.json")
    resnet, llama = build_folder("resnet"), build_folder("llama")
    open_repo, tiered_repo = tmp_path / "open", tmp_path / "tiered"
    write_model(resnet, open_repo)
    with pytest.raises(TritonConfigError, match="takes a utility from the client"):
        write_model(llama, open_repo, tiers=tiers)
    text_repo = tmp_path / "text"  # an untiered text model takes `utility` as a field: as open
    write_model(llama, text_repo, text=True)
    with pytest.raises(TritonConfigError, match="llama-text, which takes a utility"):
        write_model(resnet, text_repo, tiers=tiers)
    write_model(resnet, tiered_repo, tiers=tiers)
    assert cli.main(["triton", str(llama), "--repository", str(tiered_repo)]) == 2
    assert "is tiered (resnet)" in capsys.readouterr().err
    assert cli.main(["triton", str(resnet), "--repository", str(tiered_repo), "--bare"]) == 2
    assert "is tiered (resnet)" in capsys.readouterr().err
    assert sorted(p.name for p in open_repo.iterdir()) == ["resnet"]
    assert sorted(p.name for p in tiered_repo.iterdir()) == ["resnet"]
    write_model(resnet, tiered_repo, tiers=tiers)  # the entry itself may be rewritten
    write_model(resnet, open_repo)


def test_a_text_generation_build_gets_its_text_model(build_folder, tmp_path, capsys):
    """`aim triton build/llama` writes llama and llama-text: a decoupled model with no input tensors
    (the generate fields arrive as request parameters), text_output, the build's tokenizer and engine."""
    folder = build_folder("llama")
    repo = tmp_path / "repo"
    assert (
        cli.main(["triton", str(folder), "--repository", str(repo), "--tiers", str(_tiers(tmp_path / "t.json"))]) == 0
    )
    assert sorted(p.name for p in repo.iterdir()) == ["llama", "llama-text"]
    config = read_config(repo / "llama-text")
    assert config.backend == "python" and config.model_transaction_policy.decoupled and config.max_batch_size == 0
    assert list(config.input) == [] and [(o.name, pb.DataType.Name(o.data_type)) for o in config.output] == [
        ("text_output", "TYPE_STRING")
    ]
    version = repo / "llama-text" / "1"
    manifest = Manifest.load(folder)
    assert sha256(version / "model.onnx") == sha256(manifest.engine_path())
    assert sha256(version / "tokenizer" / "tokenizer.json") == sha256(folder / manifest.tokenizer / "tokenizer.json")
    spec = FrontSpec.load(version)
    assert spec.role == "text" and spec.tiered and spec.extra["max_positions"] == manifest.max_positions
    assert (version / "tiers.json").is_file() and "aim.serving.text_front" in (version / "model.py").read_text()
    assert not (repo / "resnet-text").exists()
    assert cli.main(["triton", str(build_folder("resnet")), "--repository", str(tmp_path / "r2")]) == 0
    assert sorted(p.name for p in (tmp_path / "r2").iterdir()) == ["resnet"]  # no text model for an image model
