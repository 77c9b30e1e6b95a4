"""One build for every source (pipeline/builder.py): the reuse rule, the refusal of failed builds, what
the log says is modulated, the engine profile's largest batch, per-step memory that leaves the
process's peak counter alone, and statistics that draw as many values as they need.

The sources here are hand-made ONNX graphs (tests/conftest.tiny_classifier): a build of one takes a
few seconds, the statistics most of it."""

from __future__ import annotations

import shutil
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from aim.cli import main
from aim.contract import BATCH
from aim.errors import AimError
from aim.layout import Manifest
from aim.pipeline.builder import build, reusable
from aim.pipeline.memory import peak_rss
from aim.pipeline.model_source import FamilySource
from aim.pipeline.onnx_source import OnnxSource
from aim.pipeline.request import BuildRequest
from aim.runtime.folder import Build, FailedBuildError
from aim.runtime.shapes import ShapeRanges
from aim.verify.statistics import MIN_SAMPLES, STATISTICAL_CHECKS
from tests.conftest import tiny_classifier


def quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A hand-made 10-class classifier (outputs scores and probabilities) and its verified build."""
    folder = tmp_path_factory.mktemp("classifier")
    path = tiny_classifier(folder / "classifier.onnx", 8, 10)
    shapes = ShapeRanges.parse("x:1x8", "x:4x8", "x:16x8")
    lines = []
    built = build(OnnxSource(path, "scores", shapes=shapes), BuildRequest(folder / "out"), lines.append)
    return path, built, lines


def test_the_log_names_the_modulated_output_and_its_class_axis(classifier):
    """Two outputs: the log says which one is modulated, on which axis, and that the other passes
    through; the manifest records the same. Read against the graph itself (onnx)."""
    path, built, lines = classifier
    graph = onnx.load(str(path)).graph
    assert [output.name for output in graph.output] == ["scores", "probabilities"]
    line = next(line for line in lines if "modulates output" in line)
    assert "modulates output 'scores' float32 ['batch', 10], classes on axis 1 (10 classes)" in line
    assert "passed through unchanged: 'probabilities'" in line
    modulation = built.manifest.modulation
    assert (modulation.logits, modulation.class_axis, modulation.num_classes) == ("scores", 1, 10)


def test_rank_five_logits_say_their_class_axis_and_the_axes_drawn_over(tmp_path):
    """Logits [B, C, D, H, W] (a volume): the class axis and every other axis are named."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [1, 4, 1, 1, 1], [1.0, -2.0, 0.5, 3.0])
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Mul", ["volume", "w"], ["logits"])],
            "volume",
            [helper.make_tensor_value_info("volume", TensorProto.FLOAT, ["n", 4, 2, 3, 3])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4, 2, 3, 3])],
            initializer=[weight],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    onnx.save(model, str(tmp_path / "volume.onnx"))
    lines = []
    shapes = ShapeRanges.parse("volume:1x4x2x3x3", None, "volume:8x4x2x3x3")
    built = build(OnnxSource(tmp_path / "volume.onnx", shapes=shapes), BuildRequest(tmp_path / "out"), lines.append)
    line = next(line for line in lines if "modulates output" in line)
    assert "modulates output 'logits' float32 ['batch', 4, 2, 3, 3], classes on axis 1 (4 classes)" in line
    assert "axis 0, axis 2, axis 3, axis 4" in line and "passed through" not in line
    assert built.manifest.verification.passed and built.manifest.modulation.class_axis == 1


def test_a_one_logit_model_of_a_fixed_batch_draws_enough_values(tmp_path):
    """Issue 21: one logit, a fixed batch of 16 (--max-shapes alone): the statistics repeat runs until
    each test has MIN_SAMPLES values (the checkerboard has 8 focused values a run), and the correct
    engine passes."""
    path = tiny_classifier(tmp_path / "one.onnx", features=8, classes=1)
    assert (
        main(["engine", "--onnx", str(path), "--logits", "scores", "--max-shapes", "x:16x8", "--out", str(tmp_path)])
        == 0
    )
    manifest = Manifest.load(tmp_path / "one")
    assert manifest.dynamic_dims[BATCH].max == 16 and manifest.verification.passed
    checks = {check.name: check for check in manifest.verification.checks}
    for name in STATISTICAL_CHECKS[:4]:
        assert checks[name].passed and checks[name].metrics["n"] >= MIN_SAMPLES, checks[name]


def test_reuse_rebuilds_when_one_byte_of_a_file_changed(build_folder, tmp_path, capsys):
    """Issue 21: `aim engine NAME --reuse` (what `make triton` runs first) keeps a build only if every file
    still has its recorded hash; one byte of the engine changed, it builds again, and the result opens."""
    out = tmp_path / "out"
    shutil.copytree(build_folder("resnet"), out / "resnet")
    assert main(["engine", "resnet", "--out", str(out), "--reuse"]) == 0
    assert "reused" in capsys.readouterr().err
    engine = out / "resnet" / "engine.onnxruntime.onnx"
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 1
    engine.write_bytes(bytes(data))
    with pytest.raises(AimError, match="changed since the build"):
        Build.open(out / "resnet")
    assert main(["engine", "resnet", "--out", str(out), "--reuse"]) == 0
    assert "reused" not in capsys.readouterr().err
    assert Build.open(out / "resnet").manifest.verification.passed


def test_the_reuse_rule_is_the_request_and_the_source(classifier):
    """A reused build is one made as asked: another largest batch, precision or file is not it."""
    path, built, _ = classifier
    shapes = ShapeRanges.parse("x:1x8", "x:4x8", "x:16x8")
    out = built.folder.parent
    assert reusable(OnnxSource(path, "scores", shapes=shapes), BuildRequest(out)).folder == built.folder
    assert reusable(OnnxSource(path, "scores"), BuildRequest(out)) is not None  # shapes not asked: any
    assert reusable(OnnxSource(path, "scores", shapes=shapes), BuildRequest(out, max_batch=8)) is None
    assert reusable(OnnxSource(path, "scores", shapes=shapes), BuildRequest(out, precision="fp16")) is None
    assert reusable(OnnxSource(path, "probabilities", shapes=shapes), BuildRequest(out)) is None


@pytest.fixture
def failed(classifier, tmp_path):
    """A copy of the classifier's build recorded as failed (as OUT/NAME.failed is)."""
    _, built, _ = classifier
    folder = shutil.copytree(built.folder, tmp_path / "classifier.failed")
    manifest = Manifest.load(folder)
    manifest.verification.passed = False
    manifest.verification.checks[0].passed = False
    manifest.save()
    np.save(tmp_path / "x.npy", np.ones((2, 8), np.float32))
    return folder


def test_a_failed_build_is_refused_for_use(failed, tmp_path, capsys):
    """Issue 21: `aim run NAME.failed` and `aim triton NAME.failed` refuse, exit 2, write nothing."""
    with pytest.raises(FailedBuildError, match="failed its verification"):
        Build.open(failed)
    assert main(["run", str(failed), "--input", f"x={tmp_path / 'x.npy'}"]) == 2
    err = capsys.readouterr().err
    assert "failed its verification (bare model vs bare ONNX on ONNX Runtime)" in err and "--allow-failed" in err
    assert main(["triton", str(failed), "--repository", str(tmp_path / "repo")]) == 2
    assert "failed its verification" in capsys.readouterr().err and not (tmp_path / "repo").exists()


def test_allow_failed_runs_a_failed_build_with_a_warning(failed, tmp_path, capsys):
    assert main(["run", str(failed), "--input", f"x={tmp_path / 'x.npy'}", "--allow-failed"]) == 0
    captured = capsys.readouterr()
    assert "warning:" in captured.err and "FAILED its verification" in captured.err
    assert "logits [2, 10]" in captured.out


def test_the_largest_batch_is_asked_for_and_triton_follows(classifier, tmp_path):
    """--max-batch sets the profile's largest batch; Triton's max_batch_size is the profile's."""
    from aim.serving.triton import CONFIG, write_model

    path, _, _ = classifier
    shapes = ShapeRanges.parse("x:1x8", "x:4x8", "x:16x8")
    built = build(OnnxSource(path, "scores", shapes=shapes), BuildRequest(tmp_path, max_batch=32), quiet)
    manifest = built.manifest
    assert manifest.dynamic_dims[BATCH].max == 32 and manifest.profile["x"]["max"] == [32, 8]
    target = write_model(built.folder, tmp_path / "repo")
    assert "max_batch_size: 32" in (target / CONFIG).read_text()


def test_the_default_largest_batch_of_text_fits_its_kv_cache_in_a_quarter_of_memory():
    """From the model's own config (transformers), not from the graph the rule reads: 2 (keys, values)
    x layers x KV heads x head size x positions x 4 bytes per sequence."""
    from aim.layout import Tensor
    from aim.pipeline.batch import IMAGE_MAX_BATCH, TEXT_MAX_BATCH, default_max_batch

    family = FamilySource("llama").family
    config = family.tiny()
    head = config.hidden_size // config.num_attention_heads
    positions = family.dims["total_sequence"].max
    per_sequence = 2 * config.num_hidden_layers * config.num_key_value_heads * head * positions * 4
    cache = [
        Tensor(f"past_key_values.{layer}.{kind}", "float32", [BATCH, config.num_key_value_heads, "past_sequence", head])
        for layer in range(config.num_hidden_layers)
        for kind in ("key", "value")
    ]
    inputs = [Tensor("input_ids", "int64", [BATCH, "sequence"]), *cache]
    memory = 40 * per_sequence - 4  # a quarter holds 10 sequences but for one byte
    assert default_max_batch(inputs, family.dims, "fp32", memory) == 9
    assert default_max_batch(inputs, family.dims, "fp16", memory) == 19  # half the bytes
    assert default_max_batch(inputs, family.dims, "fp32", 10**15) == TEXT_MAX_BATCH
    assert default_max_batch(inputs, family.dims, "fp32", per_sequence) == 1
    assert default_max_batch(inputs[:1], family.dims, "fp32", memory) == IMAGE_MAX_BATCH


def test_the_peak_counter_is_left_alone_and_each_step_has_its_peak(classifier, tmp_path, monkeypatch):
    """Issue 24: a step that briefly holds 400 MB records that peak, also below the process's earlier
    high-water mark (so only sampling sees it), and that mark (what /usr/bin/time and getrusage read)
    still covers every step's peak afterwards."""
    if peak_rss() is None:
        pytest.skip("no /proc/self/status here")
    path, _, _ = classifier
    higher = np.ones(1_000_000_000 // 8)  # the process's high-water mark, above what the build will reach
    del higher
    original = OnnxSource.reference

    def heavy_reference(self, *args, **kwargs):
        held = np.ones(400_000_000 // 8)  # touched: resident
        time.sleep(0.5)  # held long enough for a sampler on a busy machine
        del held
        return original(self, *args, **kwargs)

    monkeypatch.setattr(OnnxSource, "reference", heavy_reference)
    shapes = ShapeRanges.parse("x:1x8", "x:4x8", "x:16x8")
    manifest = build(OnnxSource(path, "scores", shapes=shapes), BuildRequest(tmp_path), quiet).manifest
    steps = manifest.memory_mb
    assert steps["reference"]["peak"] - steps["reference"]["start"] >= 350
    assert round(peak_rss() / 1e6, 1) >= max(step["peak"] for step in steps.values())  # MB, as recorded
    assert steps["verify"]["peak"] < steps["reference"]["peak"]  # the spike was the reference step's alone


def test_make_max_batch_reaches_the_build_and_the_triton_config(build_folder, classifier, tmp_path):
    """`make triton MAX_BATCH=N`: a build made with that largest batch is reused (the default, 32, for
    images), another is built with it, your ONNX too; Triton's max_batch_size follows."""
    from tests.test_makefile import make

    out = tmp_path / "out"
    shutil.copytree(build_folder("resnet"), out / "resnet")
    kept = make("triton", MODEL="resnet", OUT=str(out), MAX_BATCH="32", REPO=str(tmp_path / "kept"))
    assert kept.returncode == 0 and "reused" in kept.stderr, kept.stderr
    assert "max_batch_size: 32" in (tmp_path / "kept" / "resnet" / "config.pbtxt").read_text()
    path, _, _ = classifier
    onnx_flags = {"ONNX": str(path), "LOGITS": "scores", "MIN_SHAPES": "x:1x8", "MAX_SHAPES": "x:16x8"}
    built = make("triton", OUT=str(out), MAX_BATCH="12", REPO=str(tmp_path / "built"), **onnx_flags)
    assert built.returncode == 0 and "reused" not in built.stderr, built.stderr
    assert Manifest.load(out / "classifier").profile["x"]["max"] == [12, 8]
    assert "max_batch_size: 12" in (tmp_path / "built" / "classifier" / "config.pbtxt").read_text()
