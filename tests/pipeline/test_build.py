"""`make engine` end to end, per family: artifacts, manifest, verification, and failure behaviour."""

import dataclasses
import hashlib
import json

import numpy as np
import onnx
import pytest
import torch

from aim.errors import AimError, CheckpointError, UnknownModelError, VerificationError
from aim.families import _REGISTRY, get_family, list_families
from aim.files import sha256
from aim.layout import FILES, MANIFEST, REFERENCE, SCHEMA, Manifest, sealed
from aim.pipeline.build import build_model
from aim.pipeline.report import report
from aim.pipeline.verify import verify_folder
from aim.runtime.onnxruntime import OnnxRuntimeEngine
from aim.specs import Tolerance
from aim.verify.reference import Reference
from tests.conftest import load


@pytest.fixture(scope="module", params=list_families())
def built(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    lines = []
    manifest = build_model(request.param, out, log=lines.append)
    return out, manifest, lines


def test_artifacts_and_manifest(built):
    out, manifest, lines = built
    folder = out / manifest.model
    assert manifest.folder == folder
    assert sorted(p.name for p in out.iterdir()) == [manifest.model]  # no staging left
    assert [line[:5] for line in lines if line.startswith("[")] == ["[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"]
    written = json.loads((folder / MANIFEST).read_text())
    assert written["schema"] == SCHEMA and written["verification"]["passed"] is True
    for entry in written["artifacts"].values():
        assert sha256(folder / entry["path"]) == entry["sha256"]
    every_file = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert {entry["path"] for entry in written["artifacts"].values()} == every_file  # every file the build depends on
    assert {"torch", "onnx", "onnxruntime", "transformers", "python"} <= set(written["versions"])
    assert Manifest.load(folder) == manifest  # what was written reads back as the same manifest
    family, task, model = load(manifest.model)
    names = [t.name for t in manifest.graph.inputs]
    assert names == [s.name for s in task.input_specs(model)] + ["utility", "focus"]
    assert [t.name for t in manifest.graph.outputs] == [s.name for s in task.output_specs(model)]
    assert manifest.graph.outputs[0].name == "logits"
    assert manifest.graph.inputs[-1].dims == ["batch", manifest.modulation.num_classes]
    for check in manifest.verification.checks:
        assert check.passed, check
    assert any("vs PyTorch" in c.name and c.metrics["max_abs_diff"] <= family.tolerance.atol for c in manifest.verification.checks)
    text = report(manifest)
    assert "verification PASSED" in text and "max |diff|" in text


def test_engine_utility_zero_is_the_bare_model_bit_for_bit(built):
    out, manifest, _ = built
    inputs = Reference.load(manifest.folder / REFERENCE).inputs
    bare = OnnxRuntimeEngine(manifest.path("bare")).run(inputs)
    engine = OnnxRuntimeEngine(manifest.folder / FILES["engine"])
    assert np.array_equal(engine.run(inputs, 0.0, None), bare)
    mixed = engine.run(inputs, [0.0, 3.0], None)
    assert np.array_equal(mixed[0], bare[0]) and np.mean(mixed[1] != bare[1]) > 0.99


def test_noise_covers_every_logit_and_every_pixel(built):
    """The noise has the modulated logits' full shape; segmentation logits are at input resolution."""
    out, manifest, _ = built
    reference = Reference.load(manifest.folder / REFERENCE)
    upsampled = manifest.modulation.upsampled_to
    assert reference.noise_utility.shape == reference.logits.shape == reference.modulated.shape
    if upsampled:
        assert reference.logits.shape[2:] == reference.inputs[upsampled].shape[2:]
    dims = manifest.verification_graph.input("noise_utility").dims
    spatial = ["height", "width"] if upsampled else []
    assert dims == ["batch", manifest.modulation.num_classes, *spatial]


def walk_nodes(graph):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from walk_nodes(attribute.g)


def test_verify_folder_rechecks_and_detects_tampering(built):
    out, manifest, _ = built
    folder = manifest.folder
    again = verify_folder(folder)
    assert again.verification.passed and again.verification.verified
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
    manifest_path = folder / MANIFEST
    data = json.loads(manifest_path.read_text())
    try:
        onnx.save(model, str(path))
        with pytest.raises(AimError, match="changed since the build"):
            verify_folder(folder)
        # Even with its hash accepted, the differential check catches the change.
        data["artifacts"]["verification"]["sha256"] = sha256(path)
        data["artifacts"]["verification"]["bytes"] = path.stat().st_size
        manifest_path.write_text(json.dumps(sealed(data)))
        result = verify_folder(folder)
        assert result.verification.failed() == ["modulated (verification flavour) vs PyTorch reference"]
    finally:
        path.write_bytes(original)
        data["artifacts"]["verification"]["sha256"] = sha256(path)
        data["artifacts"]["verification"]["bytes"] = path.stat().st_size
        manifest_path.write_text(json.dumps(sealed(data)))


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
    strict = dataclasses.replace(get_family("resnet"), tolerance=Tolerance(atol=0.0, rtol=0.0, why="impossible"))
    monkeypatch.setitem(_REGISTRY, "resnet", strict)
    with pytest.raises(VerificationError, match="bare model vs PyTorch"):
        build_model("resnet", tmp_path, log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet.failed"]
    assert Manifest.load(tmp_path / "resnet.failed").verification.passed is False


def test_rebuild_replaces_the_previous_build(tmp_path):
    first = build_model("resnet", tmp_path, log=lambda _: None)
    second = build_model("resnet", tmp_path, seed=1, log=lambda _: None)
    assert first.artifacts["engine"].sha256 != second.artifacts["engine"].sha256
    assert Manifest.load(tmp_path / "resnet").source.seed == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet"]


@pytest.mark.parametrize("name", ["segformer", "llama"])
def test_local_checkpoint_end_to_end(tmp_path, name):
    """A checkpoint saved with save_pretrained (here, inside the test) goes through the whole pipeline,
    and the engine computes that checkpoint's logits, not the default tiny model's."""
    family, task, model = load(name, seed=42)
    model.save_pretrained(tmp_path / "ckpt")
    manifest = build_model(name, tmp_path / "build", checkpoint=tmp_path / "ckpt", log=lambda _: None)
    assert manifest.verification.passed
    assert manifest.source.checkpoint == str((tmp_path / "ckpt").resolve())
    checkpoint_files = sorted((tmp_path / "ckpt").iterdir())
    assert manifest.source.files == {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in checkpoint_files}
    inputs = Reference.load(manifest.folder / REFERENCE).inputs
    torch_inputs = {key: torch.from_numpy(value) for key, value in inputs.items()}

    def logits_of(pytorch_model):
        return task.reference_logits(pytorch_model, torch_inputs).numpy()

    out = OnnxRuntimeEngine(manifest.folder / FILES["engine"]).run(inputs)
    np.testing.assert_allclose(out, logits_of(model), atol=family.tolerance.atol, rtol=family.tolerance.rtol)
    assert not np.allclose(out, logits_of(load(name, seed=0)[2]), atol=1e-3)


def test_an_older_or_broken_manifest_is_refused_with_rebuild(built):
    _, manifest, _ = built
    path = manifest.folder / MANIFEST
    original = path.read_text()
    older = {**manifest.to_dict(), "schema": 1}
    try:
        for text, message in ((json.dumps(older), "another version.*schema 1.*rebuild"), ("{", "not readable JSON.*rebuild")):
            path.write_text(text)
            with pytest.raises(AimError, match=message):
                Manifest.load(manifest.folder)
    finally:
        path.write_text(original)
