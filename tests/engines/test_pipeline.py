"""`make engine` end to end, per family: artifacts, manifest, verification, and failure behaviour."""

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch

import aim.families as exporter
from aim.layout import sha256
from aim.runtime.onnxruntime import OnnxRuntimeEngine
from aim.pipeline.build import FILES, build_model, report, verify_folder
from aim.verify.checks import REFERENCE, model_inputs, pytorch_logits
from aim.errors import AimError, CheckpointError, UnknownModelError, VerificationError


@pytest.fixture(scope="module", params=exporter.list_models())
def built(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    lines = []
    manifest = build_model(request.param, out, log=lines.append)
    return out, manifest, lines


def test_artifacts_and_manifest(built):
    out, manifest, lines = built
    folder = out / manifest["model"]
    assert sorted(p.name for p in out.iterdir()) == [manifest["model"]]  # no staging left
    assert [line[:5] for line in lines if line.startswith("[")] == ["[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"]
    written = json.loads((folder / "manifest.json").read_text())
    assert written["verification"]["passed"] is True
    for entry in written["artifacts"].values():
        assert sha256(folder / entry["path"]) == entry["sha256"]
    assert {"torch", "onnx", "onnxruntime", "transformers", "python"} <= set(written["versions"])
    names = [t["name"] for t in written["graph"]["inputs"]]
    config = exporter.get_config(manifest["model"])
    model = exporter.load_model(config)
    assert names == [s.name for s in config.input_specs(model)] + ["utility", "focus"]
    assert [t["name"] for t in written["graph"]["outputs"]] == [s.name for s in config.output_specs(model)]
    assert written["graph"]["outputs"][0]["name"] == "logits"
    assert written["graph"]["inputs"][-1]["dims"] == ["batch", written["modulation"]["num_classes"]]
    for check in written["verification"]["checks"]:
        assert check["passed"], check
    assert any("vs PyTorch" in c["name"] and c["metrics"]["max_abs_diff"] <= config.tolerance.atol for c in written["verification"]["checks"])
    text = report(manifest)
    assert "verification PASSED" in text and "max |diff|" in text


def test_engine_utility_zero_is_the_bare_model_bit_for_bit(built):
    out, manifest, _ = built
    folder = out / manifest["model"]
    with np.load(folder / REFERENCE) as reference:
        inputs = model_inputs(dict(reference))
    bare = OnnxRuntimeEngine(folder / manifest["artifacts"]["bare"]["path"]).run(inputs)
    engine = OnnxRuntimeEngine(folder / FILES["engine"])
    assert np.array_equal(engine.run(inputs, 0.0, None), bare)
    mixed = engine.run(inputs, [0.0, 3.0], None)
    assert np.array_equal(mixed[0], bare[0]) and np.mean(mixed[1] != bare[1]) > 0.99


def test_noise_covers_every_logit_and_every_pixel(built):
    """The noise has the modulated logits' full shape; segmentation logits are at input resolution."""
    out, manifest, _ = built
    folder = out / manifest["model"]
    config = exporter.get_config(manifest["model"])
    with np.load(folder / REFERENCE) as reference:
        logits, noise = reference["pytorch_logits"], reference["noise_utility"]
        assert noise.shape == logits.shape == reference["pytorch_modulated"].shape
        if config.upsample_logits_to:
            assert logits.shape[2:] == reference[f"input.{config.upsample_logits_to}"].shape[2:]
    dims = [t["dims"] for t in manifest["verification_graph"]["inputs"] if t["name"] == "noise_utility"][0]
    spatial = ["height", "width"] if config.upsample_logits_to else []
    assert dims == ["batch", manifest["modulation"]["num_classes"], *spatial]


def walk_nodes(graph):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from walk_nodes(attribute.g)


def test_verify_folder_rechecks_and_detects_tampering(built):
    out, manifest, _ = built
    folder = out / manifest["model"]
    again = verify_folder(folder)
    assert again["verification"]["passed"] and "verified" in again["verification"]
    # Tamper with the verification graph: the noise on utility counts 1% more than it should.
    path = folder / FILES["verification"]
    model = onnx.load(str(path))
    users = [n for n in walk_nodes(model.graph) if "noise_utility" in n.input]  # inside the If branches
    assert users
    for node in users:
        node.input[list(node.input).index("noise_utility")] = "tampered_noise"
    model.graph.initializer.append(onnx.helper.make_tensor("tamper_scale", onnx.TensorProto.FLOAT, [], [1.01]))
    model.graph.node.insert(0, onnx.helper.make_node("Mul", ["noise_utility", "tamper_scale"], ["tampered_noise"]))
    original = path.read_bytes()
    try:
        onnx.save(model, str(path))
        with pytest.raises(AimError, match="changed since the build"):
            verify_folder(folder)
        # Even with its hash accepted, the differential check catches the change.
        manifest_path = folder / "manifest.json"
        data = json.loads(manifest_path.read_text())
        data["artifacts"]["verification"]["sha256"] = sha256(path)
        manifest_path.write_text(json.dumps(data))
        result = verify_folder(folder)
        failed = [c["name"] for c in result["verification"]["checks"] if not c["passed"]]
        assert failed == ["modulated (verification flavour) vs PyTorch reference"]
    finally:
        path.write_bytes(original)
        data["artifacts"]["verification"]["sha256"] = sha256(path)
        manifest_path.write_text(json.dumps(data))


def test_unknown_model_writes_nothing(tmp_path):
    with pytest.raises(UnknownModelError, match="resnet"):
        build_model("alexnet", tmp_path / "build")
    assert not (tmp_path / "build").exists()


def test_bad_checkpoint_writes_nothing(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        build_model("resnet", tmp_path / "build", checkpoint=tmp_path / "ckpt", log=lambda _: None)
    assert not (tmp_path / "build").exists()
    with pytest.raises(AimError, match="no such folder"):
        build_model("resnet", tmp_path / "build", checkpoint=tmp_path / "missing")
    assert not (tmp_path / "build").exists()


def test_failed_verification_fails_and_keeps_report_aside(tmp_path, monkeypatch):
    config = exporter.get_config("resnet")
    strict = dataclasses.replace(config, tolerance=exporter.Tolerance(atol=0.0, rtol=0.0, why="impossible"))
    monkeypatch.setitem(exporter.base._REGISTRY, "resnet", strict)
    with pytest.raises(VerificationError, match="bare model vs PyTorch"):
        build_model("resnet", tmp_path, log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet.failed"]
    manifest = json.loads((tmp_path / "resnet.failed" / "manifest.json").read_text())
    assert manifest["verification"]["passed"] is False


def test_rebuild_replaces_the_previous_build(tmp_path):
    first = build_model("resnet", tmp_path, log=lambda _: None)
    second = build_model("resnet", tmp_path, seed=1, log=lambda _: None)
    assert first["artifacts"]["engine"]["sha256"] != second["artifacts"]["engine"]["sha256"]
    written = json.loads((tmp_path / "resnet" / "manifest.json").read_text())
    assert written["source"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet"]


@pytest.mark.parametrize("name", ["segformer", "llama"])
def test_local_checkpoint_end_to_end(tmp_path, name):
    """A checkpoint saved with save_pretrained (here, inside the test) goes through the whole pipeline,
    and the engine computes that checkpoint's logits, not the default tiny model's."""
    config = exporter.get_config(name)
    model = exporter.load_model(config, seed=42)
    model.save_pretrained(tmp_path / "ckpt")
    manifest = build_model(name, tmp_path / "build", checkpoint=tmp_path / "ckpt", log=lambda _: None)
    assert manifest["verification"]["passed"]
    assert manifest["source"]["checkpoint"] == str((tmp_path / "ckpt").resolve())
    folder = tmp_path / "build" / name
    with np.load(folder / REFERENCE) as reference:
        inputs = model_inputs(dict(reference))
    torch_inputs = {key: torch.from_numpy(value) for key, value in inputs.items()}

    def logits_of(pytorch_model):
        return pytorch_logits(config, pytorch_model, torch_inputs).numpy()

    out = OnnxRuntimeEngine(folder / FILES["engine"]).run(inputs)
    np.testing.assert_allclose(out, logits_of(model), atol=config.tolerance.atol, rtol=config.tolerance.rtol)
    assert not np.allclose(out, logits_of(exporter.load_model(config, seed=0)), atol=1e-3)
