"""Issue 23: a checkpoint whose fp32 weights would not fit in memory is refused before any work, with
one error line naming the precision that fits; the threshold is read from the checkpoint's own size."""

from __future__ import annotations

import pytest

from aim.cli import main
from aim.errors import AimError
from aim.pipeline import memory
from aim.pipeline.model_source import FP32_PEAK, preflight
from tests.conftest import load


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    import torch

    folder = tmp_path_factory.mktemp("bf16") / "tiny-llama"
    model = load("llama")[2].to(torch.bfloat16)
    model.save_pretrained(folder)
    return folder, model.num_parameters()  # transformers' count: each tied weight once, as stored


def test_fp32_that_would_not_fit_stops_at_once_naming_fp16(bf16_checkpoint, tmp_path, monkeypatch, capsys):
    folder, parameters = bf16_checkpoint
    needed = int(parameters * 4 * FP32_PEAK)
    monkeypatch.setattr(memory, "machine_memory", lambda: needed - 1)
    out = tmp_path / "out"
    assert main(["engine", "--checkpoint", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "PRECISION=fp16" in err[0], err
    assert not out.exists()  # before any work: not even the output folder
    with pytest.raises(AimError):
        preflight(folder, "fp32")
    preflight(folder, "fp16")  # reduced precision is not refused for the fp32 copy it does not make


def test_fp32_that_fits_is_not_refused(bf16_checkpoint, monkeypatch):
    folder, parameters = bf16_checkpoint
    monkeypatch.setattr(memory, "machine_memory", lambda: int(parameters * 4 * FP32_PEAK) + 1)
    preflight(folder, "fp32")
    monkeypatch.setattr(memory, "machine_memory", lambda: None)  # unknown: nothing to refuse on
    preflight(folder, "fp32")
