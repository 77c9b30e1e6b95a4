"""What a checkpoint folder stores, read from safetensors headers (aim/export/checkpoint.py), and the
sharded bf16 checkpoint `make scale-check` writes (aim/benchmarks/scale.py), on a tiny config."""

import dataclasses
import json

import torch
from safetensors.torch import save_file

from aim.benchmarks.scale import make_checkpoint
from aim.export.checkpoint import checkpoint_dtype
from aim.families import _REGISTRY, get_family


def test_the_stored_dtype_comes_from_the_weights_not_the_config(tmp_path):
    save_file({"a": torch.zeros(8, 8, dtype=torch.float16), "norm": torch.zeros(4)}, tmp_path / "model.safetensors")
    assert checkpoint_dtype(tmp_path, {"dtype": "float32"}) == "float16"  # most bytes are FP16
    (tmp_path / "model.safetensors").unlink()
    assert checkpoint_dtype(tmp_path, {"torch_dtype": "bfloat16"}) == "bfloat16"  # no safetensors: the config's word
    assert checkpoint_dtype(tmp_path, {}) is None


def test_scale_checkpoint_is_sharded_bf16(tmp_path, monkeypatch):
    family = get_family("llama")
    monkeypatch.setitem(_REGISTRY, "llama", dataclasses.replace(family, scale=family.tiny))
    folder = make_checkpoint("llama", tmp_path / "ckpt")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) == 3 and (folder / "model.safetensors.index.json").is_file()
    assert checkpoint_dtype(folder, json.loads((folder / "config.json").read_text())) == "bfloat16"
    assert make_checkpoint("llama", tmp_path / "ckpt") == folder  # cached: not written again
