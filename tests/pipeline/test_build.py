"""`make engine` end to end, per family: artifacts, manifest, verification, and failure behaviour."""

import dataclasses
import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from aim.cli import main as cli_main
from aim.errors import AimError, CheckpointError, UnknownModelError, VerificationError
from aim.families import _REGISTRY, get_family, list_families
from aim.files import sha256
from aim.layout import FILES, MANIFEST, REFERENCE, SCHEMA, TOKENIZER_DIR, Manifest, sealed
from aim.pipeline.builder import build
from aim.pipeline.model_source import FamilySource
from aim.pipeline.report import report
from aim.pipeline.request import BuildRequest
from aim.pipeline.verify import verify_folder
from aim.runtime.onnxruntime import OnnxRuntimeEngine
from aim.verdicts import Tolerance
from aim.verify.compare import compare
from aim.verify.reference import Reference
from aim.verify.tolerance import SPREAD_FRACTION, logit_spread, scaled_tolerance
from tests.conftest import load


@pytest.fixture(scope="module", params=list_families())
def built(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    lines = []
    manifest = build(FamilySource(request.param), BuildRequest(out), log=lines.append).manifest
    return out, manifest, lines


def test_artifacts_and_manifest(built):
    out, manifest, lines = built
    folder = out / manifest.model
    assert manifest.folder == folder
    assert sorted(p.name for p in out.iterdir()) == [manifest.model]  # no staging left
    assert [line[:5] for line in lines if line.startswith("[")] == [
        "[1/6]",
        "[2/6]",
        "[3/6]",
        "[4/6]",
        "[5/6]",
        "[6/6]",
    ]
    written = json.loads((folder / MANIFEST).read_text())
    assert written["schema"] == SCHEMA and written["verification"]["passed"] is True
    for entry in written["artifacts"].values():
        assert sha256(folder / entry["path"]) == entry["sha256"]
    every_file = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert {entry["path"] for entry in written["artifacts"].values()} == every_file  # every file the build depends on
    assert {"torch", "onnx", "onnxruntime", "transformers", "python"} <= set(written["versions"])
    steps = ["load", "export", "reference", "passes", "engine", "verify"]
    assert list(manifest.timings_s) == list(manifest.memory_mb) == steps  # Linux: the peak of each step
    assert all(0 < m["start"] <= m["peak"] for m in manifest.memory_mb.values())
    assert Manifest.load(folder) == manifest  # what was written reads back as the same manifest
    family, task, model = load(manifest.model)
    names = [t.name for t in manifest.graph.inputs]
    assert names == [s.name for s in task.input_specs(model)] + ["utility", "focus"]
    assert [t.name for t in manifest.graph.outputs] == [s.name for s in task.output_specs(model)]
    assert manifest.graph.outputs[0].name == "logits"
    assert manifest.graph.inputs[-1].dims == ["batch", manifest.modulation.num_classes]
    for check in manifest.verification.checks:
        assert check.passed, check
    assert any(
        "vs PyTorch" in c.name and c.metrics["max_abs_diff"] <= family.tolerance.atol
        for c in manifest.verification.checks
    )
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


def test_tolerance_follows_the_logits_scale(built):
    """The fp32 tolerance is set from the reference logits' spread and recorded: an error of 1% of the
    spread in one logit fails the bare-model check, for every family (under the old fixed atol 1e-4
    such an error hid in the tiny SegFormer, whose logits differ by ~1e-3 between classes)."""
    _, manifest, _ = built
    verification, axis = manifest.verification, manifest.modulation.class_axis
    reference = Reference.load(manifest.folder / REFERENCE)
    family = get_family(manifest.model)
    spread = logit_spread(reference.logits, axis)
    engine = OnnxRuntimeEngine(manifest.path("bare")).run(reference.inputs)
    assert compare("bare", reference.logits, engine, verification.tolerance).passed
    wrong = engine.copy()
    wrong.flat[np.argmax(np.abs(reference.logits))] += 0.01 * spread
    assert not compare("bare", reference.logits, wrong, verification.tolerance).passed
    assert verification.logit_spread == spread > 0
    assert verification.tolerance == scaled_tolerance(family.tolerance, reference.logits, axis)
    assert verification.tolerance.atol == min(family.tolerance.atol, SPREAD_FRACTION * spread)


def test_aim_verify_seed_reruns_the_statistics_with_another_seed(built, capsys):
    """`aim verify --seed N`: other draws, other numbers, the same verdicts; the seed is recorded, and
    the build's own seed gives the build's numbers back."""
    from aim.cli import main

    _, manifest, _ = built
    if manifest.model != "llama":
        pytest.skip("one family is enough: its statistics need the fewest engine runs")
    numbers = {c.name: c.metrics for c in manifest.verification.checks}
    assert main(["verify", str(manifest.folder), "--seed", "7"]) == 0
    other = Manifest.load(manifest.folder).verification
    assert other.seed == 7 and other.passed
    assert {c.name: c.metrics for c in other.checks}["utility noise ~ N(0,1)"] != numbers["utility noise ~ N(0,1)"]
    assert main(["verify", str(manifest.folder), "--seed", str(manifest.verification.seed)]) == 0
    assert {c.name: c.metrics for c in Manifest.load(manifest.folder).verification.checks} == numbers
    assert "PASS  noises uncorrelated across classes and rows" in capsys.readouterr().out


def test_false_alarm_tool_on_a_build(built):
    """`make false-alarms` (aim/benchmarks/false_alarms.py), a few repeats: the real engine passes,
    every defect stand-in is caught by its check."""
    from aim.benchmarks.false_alarms import false_alarms, misses

    _, manifest, _ = built
    if manifest.model != "llama":
        pytest.skip("one family is enough: the tool is the same for all")
    engine = false_alarms(manifest.folder, repeats=1, log=lambda _: None)
    assert engine["failed_builds"] == 0 and engine["repeats"] == 1
    assert all(0 <= p["smallest_p"] <= 1 for p in engine["p_values"].values())
    found = misses(manifest.folder, repeats=1, log=lambda _: None)
    assert found.pop("none")["false_alarms"] == 0
    assert {defect: result["missed"] for defect, result in found.items()} == dict.fromkeys(found, 0)


def walk_nodes(graph):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from walk_nodes(attribute.g)


def test_verify_folder_reproduces_the_verdicts_and_detects_tampering(built):
    out, manifest, _ = built
    folder = manifest.folder
    # Whatever seed another session left behind, `aim verify` seeds ONNX Runtime (with the build's
    # seed) before its sessions exist: the same noise, so every verdict with every number again.
    onnxruntime.set_seed(12345)
    again = verify_folder(folder)
    assert again.verification.passed and again.verification.verified
    assert [c.as_dict() for c in again.verification.checks] == [c.as_dict() for c in manifest.verification.checks]
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


def test_verification_holds_one_engine_at_a_time(built, monkeypatch):
    """The bare, verification and production engines are opened in turn, each closed before the next
    opens: a large model's weights are in memory once, not three times."""
    import aim.runtime.folder
    from aim.pipeline.verify import judge_build, run_build
    from aim.tasks import get_task

    _, manifest, _ = built
    if manifest.model != "llama":
        pytest.skip("one family suffices: every task goes through the same runners (llama's is the quickest here)")
    open_now, most = set(), []

    class Counted(OnnxRuntimeEngine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            open_now.add(id(self))
            most.append(len(open_now))

        def close(self):
            open_now.discard(id(self))
            super().close()

    monkeypatch.setattr(aim.runtime.folder, "OnnxRuntimeEngine", Counted)
    task, reference = get_task(manifest.task), Reference.load(manifest.folder / REFERENCE)
    results = run_build(aim.runtime.folder.Build(manifest), reference, "onnxruntime")
    checks = judge_build(manifest, task, reference, results)
    assert all(check.passed for check in checks) and len(most) == 3 and max(most) == 1 and not open_now


def test_unknown_model_writes_nothing(tmp_path):
    with pytest.raises(UnknownModelError, match="resnet"):
        build(FamilySource("alexnet"), BuildRequest(tmp_path / "build"))
    assert not (tmp_path / "build").exists()


def test_bad_checkpoint_writes_nothing(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        build(FamilySource("resnet", tmp_path / "ckpt"), BuildRequest(tmp_path / "build"), log=lambda _: None)
    assert not (tmp_path / "build").exists()
    with pytest.raises(AimError, match="no such folder"):
        build(FamilySource("resnet", tmp_path / "missing"), BuildRequest(tmp_path / "build"))
    assert not (tmp_path / "build").exists()


def test_failed_verification_fails_and_keeps_report_aside(tmp_path, monkeypatch):
    strict = dataclasses.replace(get_family("resnet"), tolerance=Tolerance(atol=0.0, rtol=0.0, why="impossible"))
    monkeypatch.setitem(_REGISTRY, "resnet", strict)
    with pytest.raises(VerificationError, match="bare model vs PyTorch"):
        build(FamilySource("resnet"), BuildRequest(tmp_path), log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet.failed"]
    assert Manifest.load(tmp_path / "resnet.failed").verification.passed is False


def killed_build(out: Path) -> Path:
    """A build into `out` killed by SIGKILL (as the OOM killer does) once its staging folder exists;
    returns the staging folder it left behind."""
    process = subprocess.Popen(
        [sys.executable, "-m", "aim.cli", "engine", "resnet", "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while (
            not list(out.glob(f".resnet.staging-{process.pid}"))
            and time.monotonic() < deadline
            and process.poll() is None
        ):
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    return out / f".resnet.staging-{process.pid}"


def test_rebuild_replaces_the_previous_build_and_what_a_killed_one_left(tmp_path):
    leftover = killed_build(tmp_path)
    assert leftover.is_dir()
    first = build(FamilySource("resnet"), BuildRequest(tmp_path), log=lambda _: None).manifest
    assert not leftover.exists()
    second = build(FamilySource("resnet"), BuildRequest(tmp_path, seed=1), log=lambda _: None).manifest
    assert first.artifacts["engine"].sha256 != second.artifacts["engine"].sha256
    assert Manifest.load(tmp_path / "resnet").source.seed == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet"]


@pytest.mark.parametrize("name", ["segformer"])  # llama: test_bf16_checkpoint_without_a_tokenizer
def test_local_checkpoint_end_to_end(tmp_path, name):
    """A checkpoint saved with save_pretrained (here, inside the test) goes through the whole pipeline,
    and the engine computes that checkpoint's logits, not the default tiny model's."""
    family, task, model = load(name, seed=42)
    model.save_pretrained(tmp_path / "ckpt")
    manifest = build(
        FamilySource(name, tmp_path / "ckpt"), BuildRequest(tmp_path / "build"), log=lambda _: None
    ).manifest
    assert manifest.verification.passed
    assert manifest.source.checkpoint == str((tmp_path / "ckpt").resolve())
    checkpoint_files = sorted((tmp_path / "ckpt").iterdir())
    assert manifest.source.files == {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in checkpoint_files
    }
    inputs = Reference.load(manifest.folder / REFERENCE).inputs
    torch_inputs = {key: torch.from_numpy(value) for key, value in inputs.items()}

    def logits_of(pytorch_model):
        return task.reference_logits(pytorch_model, torch_inputs).numpy()

    out = OnnxRuntimeEngine(manifest.folder / FILES["engine"]).run(inputs)
    tolerance = manifest.verification.tolerance  # the family's, tightened to the logits' scale
    np.testing.assert_allclose(out, logits_of(model), atol=tolerance.atol, rtol=tolerance.rtol)
    assert not np.allclose(out, logits_of(load(name, seed=0)[2]), atol=1e-3)


def test_bf16_checkpoint_without_a_tokenizer(tmp_path, capsys):
    """A Llama checkpoint stored in bf16 and without a tokenizer, as users' checkpoints come: exported and
    verified in FP32 (the manifest says what the checkpoint stores), its greedy tokens checked on token
    ids, no tokenizer trained for it, and `generate` refused with what to do."""
    from transformers import LlamaForCausalLM

    family, task, model = load("llama", seed=42)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "ckpt")
    lines = []
    manifest = build(
        FamilySource("llama", tmp_path / "ckpt"), BuildRequest(tmp_path / "build"), log=lines.append
    ).manifest
    assert manifest.verification.passed and manifest.source.dtype == "bfloat16"
    assert manifest.tokenizer is None and not (manifest.folder / TOKENIZER_DIR).exists()
    assert any(
        "stored as bfloat16, loaded in float32" in line and "no tokenizer in the checkpoint" in line for line in lines
    )
    greedy = next(c for c in manifest.verification.checks if c.name.startswith("greedy tokens"))
    assert greedy.passed and greedy.metrics["tokens"] > 0
    weights = onnx.load(str(manifest.path("exported"))).graph.initializer
    assert {onnx.TensorProto.DataType.Name(w.data_type) for w in weights if w.data_type in (1, 10, 16)} == {"FLOAT"}
    # The engine computes the checkpoint's weights upcast to FP32, as transformers itself loads them.
    upcast = LlamaForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    inputs = Reference.load(manifest.folder / REFERENCE).inputs
    expected = task.reference_logits(upcast, {key: torch.from_numpy(value) for key, value in inputs.items()}).numpy()
    out = OnnxRuntimeEngine(manifest.folder / FILES["engine"]).run(inputs)
    np.testing.assert_allclose(out, expected, atol=family.tolerance.atol, rtol=family.tolerance.rtol)
    assert not np.allclose(
        out,
        task.reference_logits(load("llama", seed=0)[2], {k: torch.from_numpy(v) for k, v in inputs.items()}).numpy(),
        atol=1e-3,
    )
    capsys.readouterr()
    assert cli_main(["generate", str(manifest.folder), "--prompt", "hello"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: ")
        and "without a tokenizer" in err
        and "save_pretrained(DIR)" in err
        and "Traceback" not in err
    )


def test_an_older_or_broken_manifest_is_refused_with_rebuild(built):
    _, manifest, _ = built
    path = manifest.folder / MANIFEST
    original = path.read_text()
    older = {**manifest.to_dict(), "schema": 1}
    try:
        for text, message in (
            (json.dumps(older), "another version.*schema 1.*rebuild"),
            ("{", "not readable JSON.*rebuild"),
        ):
            path.write_text(text)
            with pytest.raises(AimError, match=message):
                Manifest.load(manifest.folder)
    finally:
        path.write_text(original)
