"""Export of every family: dynamic shapes, checkpoints, and the registry's errors."""

import json

import numpy as np
import onnx
import pytest
import torch

from aim.errors import CheckpointError, UnknownModelError
from aim.export.torch_export import export_onnx
from aim.families import get_family, list_families
from aim.pipeline import steps
from aim.runtime.onnxruntime import OnnxRuntimeEngine
from aim.verify.compare import compare
from aim.verify.tolerance import scaled_tolerance
from tests.conftest import load

# Shapes away from the export example (batch 2) on every dynamic dim.
SHAPES = {
    "resnet": [dict(batch=1, height=32, width=32), dict(batch=3, height=64, width=48)],
    "segformer": [dict(batch=1, height=64, width=64), dict(batch=3, height=96, width=32)],
    "llama": [dict(batch=1, sequence=5), dict(batch=3, sequence=17)],
}


def test_every_family_has_shapes_here():
    assert set(SHAPES) == set(list_families()) == {"resnet", "segformer", "llama"}


def test_exported_graph_declares_dynamic_axes(family):
    graph = onnx.load(str(family.path("exported"))).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    for spec in family.task.input_specs(family.model):
        for axis, name in spec.dynamic_axes.items():
            assert dims[spec.name][axis] == name
    outputs = family.task.output_specs(family.model)
    assert [o.name for o in graph.output] == [s.name for s in outputs]
    assert graph.output[0].name == "logits"
    # The task's rank holds: text generation exports next-token logits [B, V], never [B, S, V].
    assert len(graph.output[0].type.tensor_type.shape.dim) == len(outputs[0].dims)


def test_dynamic_shapes_match_pytorch(family):
    """Batch 1 and 3, two image sizes / two sequence lengths, through the modulated engine at utility 0."""
    engine = OnnxRuntimeEngine(family.path("production"))
    for sizes in SHAPES[family.name]:
        inputs = family.inputs(seed=3, **sizes)
        expected = family.logits(inputs)
        out = engine.run({k: v.numpy() for k, v in inputs.items()}, utility=0.0)
        assert out.shape == tuple(expected.shape)
        assert out.shape[0] == sizes["batch"]
        if "height" in sizes and family.task.upsample_logits_to:
            assert out.shape[2:] == (sizes["height"], sizes["width"])  # per input pixel
        tol = scaled_tolerance(
            family.family.tolerance, expected.numpy(), family.task.class_axis
        )  # as make engine sets it
        np.testing.assert_allclose(out, expected.numpy(), atol=tol.atol, rtol=tol.rtol)


def test_upsampled_logits_are_what_transformers_post_processing_computes(family, monkeypatch):
    """The bare graph's logits at input resolution against transformers' own post-processor for the
    architecture (SegFormer: post_process_semantic_segmentation), not against this project's twin: the
    resized logits it computes (captured from its F.interpolate call) element-wise, within the build's
    tolerance rule, and the segmentation maps it returns, wherever the top two classes are further
    apart than that tolerance."""
    if not family.task.upsample_logits_to:
        pytest.skip("the task modulates the model's logits as they come")
    import transformers
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    processor = getattr(transformers, IMAGE_PROCESSOR_MAPPING_NAMES[family.family.model_type][0])()
    inputs = family.inputs(seed=5, batch=2, height=72, width=40)
    with torch.no_grad():
        outputs = family.model(**inputs)
    resized, interpolate = [], torch.nn.functional.interpolate
    monkeypatch.setattr(
        torch.nn.functional, "interpolate", lambda *a, **k: resized.append(interpolate(*a, **k)) or resized[-1]
    )
    maps = np.stack(
        [m.numpy() for m in processor.post_process_semantic_segmentation(outputs, target_sizes=[(72, 40)] * 2)]
    )
    theirs = torch.cat(resized).numpy()
    ours = OnnxRuntimeEngine(family.path("bare")).run({k: v.numpy() for k, v in inputs.items()})
    axis = family.task.class_axis
    tolerance = scaled_tolerance(family.family.tolerance, theirs, axis)
    check = compare("bare vs transformers' post-processing", theirs, ours, tolerance)
    assert check.passed, check.detail
    top2 = -np.sort(-theirs, axis=axis)[:, :2]
    clear = top2[:, 0] - top2[:, 1] > 2 * tolerance.atol
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(ours.argmax(axis)[clear], maps[clear])


def test_unknown_model_lists_the_models():
    with pytest.raises(UnknownModelError, match="'gpt5'.*llama, resnet, segformer"):
        get_family("gpt5")


def test_checkpoint_round_trip(tmp_path):
    """A model saved with save_pretrained loads with the same weights and exports the same logits."""
    family, task, original = load("resnet", seed=7)
    original.save_pretrained(tmp_path / "ckpt")
    loaded = load("resnet", tmp_path / "ckpt")[2]
    other_seed = load("resnet", seed=8)[2]
    inputs = task.example_inputs(original, family.sizes(batch=2, height=32, width=40))
    a = task.reference_logits(original, inputs)
    assert torch.equal(a, task.reference_logits(loaded, inputs))
    assert not torch.allclose(a, task.reference_logits(other_seed, inputs))
    path = steps.export(family, task, loaded, tmp_path / "ckpt.onnx")
    out = OnnxRuntimeEngine(path).run({"pixel_values": inputs["pixel_values"].numpy()})
    np.testing.assert_allclose(out, a.numpy(), atol=family.tolerance.atol, rtol=family.tolerance.rtol)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load("resnet", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="holds a 'llama' model, but MODEL=resnet expects 'resnet'"):
        load("resnet", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    with pytest.raises(CheckpointError, match="could not load"):
        load("resnet", tmp_path)  # a config but no weights
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        load("resnet", tmp_path)


def test_export_leaves_no_partial_file(tmp_path):
    family, task, model = load("resnet")

    class Broken(torch.nn.Module):
        def forward(self, pixel_values):
            raise RuntimeError("tracing failed")

    inputs = task.example_inputs(model, family.sizes(**family.verify_sizes))
    with pytest.raises(RuntimeError, match="tracing failed"):
        export_onnx(
            Broken(), inputs, task.input_specs(model), task.output_specs(model), tmp_path / "out" / "model.onnx"
        )
    assert not (tmp_path / "out").exists()  # neither the partial file nor the folder made for it
