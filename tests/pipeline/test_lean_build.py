"""Issue 24 item 3: a small checkpoint builds as lean as a large one. Below 2 GiB too, the graphs of a
build folder (exported, modulated, verification, the ONNX Runtime engine) refer to one weights file, no
graph holds weights of its own, and ONNX Runtime's optimised model does not write a second copy: the
folder is at most 1.3 times the checkpoint's bytes."""

from __future__ import annotations

import onnx
import pytest

from aim.layout import FILES, Manifest
from aim.pipeline import model_source as model_source_module
from aim.pipeline.builder import build
from aim.pipeline.model_source import model_source
from aim.pipeline.request import BuildRequest
from aim.weights import data_files
from tests.conftest import load


def folder_bytes(folder) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


@pytest.fixture(scope="module", params=["torchscript", "dynamo"])
def fp32_build(request, tmp_path_factory):
    """An FP32 build of a small Llama checkpoint stored in fp32: exported by TorchScript (it is under
    LEAN_EXPORT_BYTES), and by the dynamo exporter on a FakeTensor model with that threshold at 0."""
    root = tmp_path_factory.mktemp("lean")
    load("llama")[2].save_pretrained(root / "checkpoint")  # fp32, as stored by the family's model
    lines = []
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "dynamo":
            patch.setattr(model_source_module, "LEAN_EXPORT_BYTES", 0)
        built = build(model_source(None, root / "checkpoint"), BuildRequest(root / "out"), lines.append)
    return root / "checkpoint", built.manifest.folder, request.param, lines


def test_the_build_folder_is_at_most_1_3_times_the_checkpoint(fp32_build):
    checkpoint, folder, *_ = fp32_build
    ratio = folder_bytes(folder) / folder_bytes(checkpoint)
    assert ratio <= 1.3, f"the build folder is {ratio:.2f} times the checkpoint"


def test_every_graph_and_the_engine_share_one_weights_file(fp32_build):
    _, folder, *_ = fp32_build
    weights = (folder / FILES["weights"]).stat().st_size
    for key in ("exported", "modulated", "verification", "engine"):
        path = folder / FILES[key]
        assert data_files(onnx.load(str(path), load_external_data=False)) == [FILES["weights"]], key
        assert path.stat().st_size < 0.02 * weights, f"{key} holds weights of its own"
    assert [path.name for path in folder.glob("*.data")] == [FILES["weights"]]


def test_the_fp32_export_takes_the_chosen_way_and_computes_what_transformers_computes(fp32_build):
    """Issue 24: an FP32 build of a supported checkpoint past LEAN_EXPORT_BYTES exports the lean way, its
    weights attached in FP32: its graph gives transformers' FP32 logits within FP32 rounding (measured
    ~3e-7; weights rounded to FP16 give ~5e-4), and it verifies element-wise."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from aim.families.from_checkpoint import checkpoint_family
    from aim.tasks import get_task

    checkpoint, folder, exporter, lines = fp32_build
    lean = [line for line in lines if "export to ONNX in float32 (torch.onnx dynamo" in line]
    assert len(lean) == (exporter == "dynamo"), lines
    exported = onnx.load(str(folder / FILES["exported"]), load_external_data=False)
    assert {t.data_type for t in exported.graph.initializer if len(t.dims) == 2} == {onnx.TensorProto.FLOAT}
    family = checkpoint_family(checkpoint)
    task = get_task(family.task)
    model = family.model_class_object().from_pretrained(checkpoint, dtype=torch.float32)
    inputs = task.example_inputs(model, family.sizes(**family.verify_sizes))
    expected = task.reference_logits(model, inputs).numpy()
    session = ort.InferenceSession(str(folder / FILES["exported"]), providers=["CPUExecutionProvider"])
    got = session.run(None, {name: array.numpy() for name, array in inputs.items()})[0]
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-5
    checks = {check.name: check for check in Manifest.load(folder).verification.checks}
    assert checks["bare model vs PyTorch"].passed  # element-wise at FP32 tolerances


def test_an_fp16_graph_of_the_dynamo_export_keeps_rotary_in_fp32(fp32_build):
    """PRECISION=fp16 from the FP32 export: the FP16 pass keeps the rotary embeddings in FP32, found by
    module path (Task.keep_fp32); the dynamo export names its nodes by module path as TorchScript does."""
    from aim.families.from_checkpoint import checkpoint_family
    from aim.graph_passes.fp16 import convert_to_fp16, fp32_violations
    from aim.graph_passes.io import load_onnx
    from aim.tasks import get_task
    from aim.weights import WeightsFile

    checkpoint, folder, exporter, _ = fp32_build
    family = checkpoint_family(checkpoint)
    keep = family.fp16_keep_fp32 + get_task(family.task).keep_fp32(
        family.model_class_object().from_pretrained(checkpoint)
    )
    graph = load_onnx(folder / FILES["exported"])
    assert {node.op_type for node in graph.graph.node if node.name.startswith(keep)} >= {"Cos", "Sin"}, exporter
    with WeightsFile(folder.parent / f"half-{exporter}.data") as weights:
        half = convert_to_fp16(graph, keep, weights, folder)
    assert fp32_violations(half, keep) == []


def test_an_fp16_build_of_a_bf16_checkpoint_keeps_one_fp16_copy(tmp_path):
    """Issue 23: `make engine CHECKPOINT=dir PRECISION=fp16` on a bf16 checkpoint exports in fp16 without
    an fp32 copy (no fp32 graphs, no second weights file), verifies, and records each step's anonymous peak."""
    import torch

    load("llama")[2].to(torch.bfloat16).save_pretrained(tmp_path / "checkpoint")
    lines = []
    built = build(
        model_source(None, tmp_path / "checkpoint"), BuildRequest(tmp_path / "out", precision="fp16"), lines.append
    )
    manifest = built.manifest
    assert manifest.verification.passed and manifest.precision == "fp16"
    folder = manifest.folder
    assert [path.name for path in folder.glob("*.data")] == [FILES["weights"]]
    ratio = folder_bytes(folder) / folder_bytes(tmp_path / "checkpoint")
    assert ratio <= 1.3, f"the build folder is {ratio:.2f} times the checkpoint"
    exported = onnx.load(str(folder / FILES["exported"]), load_external_data=False)
    assert {t.data_type for t in exported.graph.initializer if len(t.dims) == 2} == {onnx.TensorProto.FLOAT16}
    assert any("mapped as stored" in line for line in lines)
    assert all("anonymous" in step for step in manifest.memory_mb.values())
