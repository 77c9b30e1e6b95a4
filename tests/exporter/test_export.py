"""Export of every family: dynamic shapes, checkpoints, and the registry's errors."""

import json

import numpy as np
import onnx
import pytest
import torch

import aim.families as exporter
from aim.runtime.onnxruntime import OnnxRuntimeEngine
from aim.errors import CheckpointError, UnknownModelError
from aim.verify.checks import pytorch_logits

# Shapes away from the export example (batch 2) on every dynamic dim.
SHAPES = {
    "resnet": [dict(batch=1, height=32, width=32), dict(batch=3, height=64, width=48)],
    "segformer": [dict(batch=1, height=64, width=64), dict(batch=3, height=96, width=32)],
    "llama": [dict(batch=1, sequence=5), dict(batch=3, sequence=17)],
}


def test_every_family_has_shapes_here():
    assert set(SHAPES) == set(exporter.list_models()) == {"resnet", "segformer", "llama"}


def test_exported_graph_declares_dynamic_axes(family):
    graph = onnx.load(str(family.path("exported"))).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    for spec in family.config.input_specs(family.model):
        for axis, name in spec.dynamic_axes.items():
            assert dims[spec.name][axis] == name
    assert [o.name for o in graph.output] == [s.name for s in family.config.output_specs(family.model)]
    assert graph.output[0].name == family.config.logits.name
    # The config's rank holds: Llama exports next-token logits [B, V], never [B, S, V].
    assert len(graph.output[0].type.tensor_type.shape.dim) == len(family.config.logits.dims)


def test_dynamic_shapes_match_pytorch(family):
    """Batch 1 and 3, two image sizes / two sequence lengths, through the modulated engine at utility 0."""
    config = family.config
    engine = OnnxRuntimeEngine(family.path("production"))
    for sizes in SHAPES[config.name]:
        inputs = exporter.example_inputs(config, family.model, seed=3, **sizes)
        expected = pytorch_logits(config, family.model, inputs)
        out = engine.run({k: v.numpy() for k, v in inputs.items()}, utility=0.0)
        assert out.shape == tuple(expected.shape)
        assert out.shape[0] == sizes["batch"]
        if "height" in sizes and config.upsample_logits_to:
            assert out.shape[2:] == (sizes["height"], sizes["width"])  # per input pixel
        tol = config.tolerance
        np.testing.assert_allclose(out, expected.numpy(), atol=tol.atol, rtol=tol.rtol)


def test_unknown_model_lists_the_models():
    with pytest.raises(UnknownModelError, match="'gpt5'.*llama, resnet, segformer"):
        exporter.get_config("gpt5")


def test_checkpoint_round_trip(tmp_path):
    """A model saved with save_pretrained loads with the same weights and exports the same logits."""
    config = exporter.get_config("resnet")
    original = exporter.load_model(config, seed=7)
    original.save_pretrained(tmp_path / "ckpt")
    loaded = exporter.load_model(config, tmp_path / "ckpt")
    other_seed = exporter.load_model(config, seed=8)
    inputs = exporter.example_inputs(config, original, batch=2, height=32, width=40)
    a = exporter.reference_logits(config, original, inputs)
    assert torch.equal(a, exporter.reference_logits(config, loaded, inputs))
    assert not torch.allclose(a, exporter.reference_logits(config, other_seed, inputs))
    path = exporter.export_onnx(config, loaded, tmp_path / "ckpt.onnx")
    out = OnnxRuntimeEngine(path).run({"pixel_values": inputs["pixel_values"].numpy()})
    np.testing.assert_allclose(out, a.numpy(), atol=config.tolerance.atol, rtol=config.tolerance.rtol)


def test_checkpoint_errors(tmp_path):
    config = exporter.get_config("resnet")
    with pytest.raises(CheckpointError, match="no config.json"):
        exporter.load_model(config, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="holds a 'llama' model, but MODEL=resnet expects 'resnet'"):
        exporter.load_model(config, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    with pytest.raises(CheckpointError, match="could not load"):
        exporter.load_model(config, tmp_path)  # a config but no weights


def test_export_leaves_no_partial_file(tmp_path):
    config = exporter.get_config("resnet")
    model = exporter.load_model(config)

    class Broken(torch.nn.Module):
        def forward(self, pixel_values):
            raise RuntimeError("tracing failed")

    broken = exporter.base.ExportConfig(**{**config.__dict__, "name": "broken", "wrap": lambda m: Broken()})
    with pytest.raises(RuntimeError, match="tracing failed"):
        exporter.export_onnx(broken, model, tmp_path / "out" / "model.onnx")
    assert list((tmp_path / "out").iterdir()) == []
