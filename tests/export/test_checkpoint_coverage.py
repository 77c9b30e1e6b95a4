"""A checkpoint must cover the model it describes: missing, unexpected and reshaped tensors are refused
with their names, before anything is written."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from aim.cli import main
from aim.errors import CheckpointError
from aim.export.torch_export import load_checkpoint
from aim.families import get_family
from tests.conftest import load

HEAD = ("classifier.1.bias", "classifier.1.weight")  # the tiny ResNet's classification head


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    load("resnet", seed=3)[2].save_pretrained(folder)
    return folder, load_file(folder / "model.safetensors")


def write(folder, weights):
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_a_checkpoint_without_its_head_is_refused_and_nothing_is_written(checkpoint, tmp_path, capsys):
    folder, weights = checkpoint
    assert set(HEAD) <= set(weights)
    write(folder, {key: value for key, value in weights.items() if key not in HEAD})
    try:
        assert main(["engine", "resnet", "--checkpoint", str(folder), "--out", str(tmp_path / "out")]) == 2
    finally:
        write(folder, weights)
    err = capsys.readouterr().err
    assert "2 tensor(s) missing from the checkpoint: classifier.1.bias, classifier.1.weight" in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_unexpected_and_reshaped_tensors_are_named(checkpoint):
    folder, weights = checkpoint
    model_class = get_family("resnet").model_class_object()
    try:
        write(folder, {**weights, "extra.weight": torch.zeros(3)})
        with pytest.raises(
            CheckpointError, match=r"1 tensor\(s\) in the checkpoint but not in the model: extra.weight"
        ):
            load_checkpoint(model_class, folder)
        classes, width = weights["classifier.1.weight"].shape
        write(folder, {**weights, "classifier.1.weight": torch.zeros(classes - 3, width)})
        with pytest.raises(
            CheckpointError,
            match=rf"another shape than the model's: classifier.1.weight \(the model's is \[{classes}, {width}\]\)",
        ):
            load_checkpoint(model_class, folder)
    finally:
        write(folder, weights)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file" * 10)
    try:
        with pytest.raises(CheckpointError, match="could not load the checkpoint"):
            load_checkpoint(model_class, folder)
    finally:
        write(folder, weights)
    model = load_checkpoint(model_class, folder)  # the whole checkpoint loads, with its own weights
    assert torch.equal(model.state_dict()["classifier.1.weight"], weights["classifier.1.weight"])
