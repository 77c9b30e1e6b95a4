"""Issue 24 item 3: a small checkpoint builds as lean as a large one. Below 2 GiB too, the graphs of a
build folder (exported, modulated, verification, the ONNX Runtime engine) refer to one weights file, no
graph holds weights of its own, and ONNX Runtime's optimised model does not write a second copy: the
folder is at most 1.3 times the checkpoint's bytes."""

from __future__ import annotations

import onnx
import pytest

from aim.layout import FILES
from aim.pipeline.builder import build
from aim.pipeline.model_source import model_source
from aim.pipeline.request import BuildRequest
from aim.weights import data_files
from tests.conftest import load


def folder_bytes(folder) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


@pytest.fixture(scope="module")
def fp32_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("lean")
    load("llama")[2].save_pretrained(root / "checkpoint")  # fp32, as stored by the family's model
    built = build(model_source(None, root / "checkpoint"), BuildRequest(root / "out"), lambda line: None)
    return root / "checkpoint", built.manifest.folder


def test_the_build_folder_is_at_most_1_3_times_the_checkpoint(fp32_build):
    checkpoint, folder = fp32_build
    ratio = folder_bytes(folder) / folder_bytes(checkpoint)
    assert ratio <= 1.3, f"the build folder is {ratio:.2f} times the checkpoint"


def test_every_graph_and_the_engine_share_one_weights_file(fp32_build):
    _, folder = fp32_build
    weights = (folder / FILES["weights"]).stat().st_size
    for key in ("exported", "modulated", "verification", "engine"):
        path = folder / FILES[key]
        assert data_files(onnx.load(str(path), load_external_data=False)) == [FILES["weights"]], key
        assert path.stat().st_size < 0.02 * weights, f"{key} holds weights of its own"
    assert [path.name for path in folder.glob("*.data")] == [FILES["weights"]]


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
