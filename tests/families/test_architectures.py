"""The architecture matrix: every architecture listed as tested goes through `make engine CHECKPOINT=dir`
(no MODEL) from a tiny random checkpoint saved here, and passes every check of the build (element-wise
against PyTorch, the noise statistics, and for text generation greedy tokens = transformers'
generate() and cached = recomputed logits). The engine is also compared with transformers' own
Auto class on the checkpoint, outside aim's code. Optimum's rule: an architecture listed as tested
without a config here fails the first test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aim.errors import CheckpointError
from aim.families.architectures import FIXED_IMAGE_SIZE, REFUSED, TESTED, architecture_of
from aim.families.from_checkpoint import build_name, checkpoint_family
from aim.layout import FILES, REFERENCE
from aim.pipeline.builder import build
from aim.pipeline.model_source import CheckpointSource
from aim.pipeline.request import BuildRequest
from aim.runtime.onnxruntime import OnnxRuntimeEngine
from aim.tasks import get_task
from aim.verify.reference import Reference

VOCAB = 512  # tiny language models: enough for a byte-level tokenizer (259 ids at least)
CLASSES, SEGMENTS = 1000, 7  # ImageNet's classes: a wide head needs few runs for the noise statistics


def _text(name, **fields):
    def make():
        import transformers

        return getattr(transformers, name)(vocab_size=VOCAB, **fields)

    return make


def _vision(name, **fields):
    def make():
        import transformers

        return getattr(transformers, name)(**fields)

    return make


def _upernet():
    from transformers import ConvNextConfig, UperNetConfig

    backbone = ConvNextConfig(
        hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], out_features=["stage1", "stage2", "stage3", "stage4"]
    )
    return UperNetConfig(backbone_config=backbone, hidden_size=16, auxiliary_in_channels=32, num_labels=SEGMENTS)


_VIT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
)
_BEIT = dict(_VIT, num_hidden_layers=4, out_indices=[1, 2, 3, 4], num_labels=SEGMENTS)
# Small widths; where the architecture has a head size of its own it differs from hidden / heads
# (16 vs 8), so that a cache shaped from hidden / heads would fail.
_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
CONFIGS = {
    "image-classification": {
        "convnext": _vision("ConvNextConfig", hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_labels=CLASSES),
        # hidden_dim is the top convolution's width, round_filters(1280 * width_coefficient)
        "efficientnet": _vision(
            "EfficientNetConfig", width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128, num_labels=CLASSES
        ),
        "mobilenet_v2": _vision("MobileNetV2Config", depth_multiplier=0.25, num_labels=CLASSES),
        "resnet": _vision(
            "ResNetConfig",
            embedding_size=8,
            hidden_sizes=[8, 16, 32, 64],
            depths=[1, 1, 1, 1],
            layer_type="basic",
            num_labels=CLASSES,
        ),
        "swin": _vision(
            "SwinConfig",
            image_size=32,
            patch_size=4,
            embed_dim=8,
            depths=[1, 1],
            num_heads=[1, 2],
            window_size=2,
            num_labels=CLASSES,
        ),
        "vit": _vision("ViTConfig", **_VIT, num_labels=CLASSES),
    },
    "semantic-segmentation": {
        "beit": _vision("BeitConfig", **_BEIT),
        "data2vec-vision": _vision("Data2VecVisionConfig", **_BEIT),
        "dpt": _vision(
            "DPTConfig",
            **dict(_VIT, num_hidden_layers=4),
            backbone_out_indices=[0, 1, 2, 3],
            neck_hidden_sizes=[8, 16, 32, 32],
            fusion_hidden_size=16,
            num_labels=SEGMENTS,
        ),
        "mobilenet_v2": _vision("MobileNetV2Config", depth_multiplier=0.25, num_labels=SEGMENTS),
        "mobilevit": _vision(
            "MobileViTConfig",
            hidden_sizes=[16, 16, 16],
            neck_hidden_sizes=[8, 8, 16, 16, 16, 32, 64],
            aspp_out_channels=16,
            num_labels=SEGMENTS,
        ),
        "mobilevitv2": _vision("MobileViTV2Config", width_multiplier=0.25, aspp_out_channels=16, num_labels=SEGMENTS),
        "segformer": _vision(
            "SegformerConfig",
            depths=[1, 1, 1, 1],
            hidden_sizes=[8, 16, 32, 64],
            num_attention_heads=[1, 1, 2, 2],
            decoder_hidden_size=16,
            num_labels=SEGMENTS,
        ),
        "upernet": _upernet,
    },
    "text-generation": {
        "falcon": _text(
            "FalconConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=4
        ),  # multi-query: one key/value head
        "gemma": _text("GemmaConfig", **_DECODER, head_dim=16),
        # sliding windows shorter than the generation checks' sequences (up to ~22 tokens)
        "gemma2": _text("Gemma2Config", **_DECODER, head_dim=16, sliding_window=8),
        "gemma3_text": _text("Gemma3TextConfig", **_DECODER, head_dim=16, sliding_window=8),
        "gpt2": _text("GPT2Config", n_embd=32, n_layer=2, n_head=4, n_positions=128),
        "gpt_neox": _text(
            "GPTNeoXConfig", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
        ),
        "llama": _text("LlamaConfig", **_DECODER, head_dim=16),
        "mistral": _text("MistralConfig", **_DECODER, head_dim=16),
        "opt": _text(
            "OPTConfig",
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            max_position_embeddings=128,
        ),
        "phi3": _text("Phi3Config", **_DECODER, pad_token_id=0),
        "qwen2": _text("Qwen2Config", **_DECODER),
        "qwen3": _text("Qwen3Config", **_DECODER, head_dim=16),
    },
}
CASES = [(task, model_type) for task, configs in CONFIGS.items() for model_type in configs]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Models this small run fastest on one thread (PyTorch's pool costs more than it saves, several
    times more on a machine other jobs share)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_tested_architecture_has_a_case():
    """Optimum's rule: listed as tested means built here, and nothing is built here unlisted."""
    assert {task: sorted(configs) for task, configs in CONFIGS.items()} == {
        task: sorted(names) for task, names in TESTED.items()
    }


def save_checkpoint(folder, task: str, model_type: str, seed: int = 0):
    """A tiny random-weight model of the architecture, saved as a user would (`save_pretrained`), with a
    tokenizer for language models. Returns the PyTorch model."""
    import transformers
    from optimum.exporters.tasks import TasksManager

    from aim.export.tokenizer import demo_tokenizer

    config = CONFIGS[task][model_type]()
    auto = TasksManager.get_model_class_for_task(task, model_type=config.model_type)
    torch.manual_seed(seed)
    model = auto.from_config(config).eval()
    assert isinstance(model, transformers.PreTrainedModel) and model.config.model_type == model_type
    model.save_pretrained(folder)
    if task == "text-generation":
        demo_tokenizer(VOCAB).save_pretrained(folder)
    if model_type == "upernet":  # its config has no image size: the one size it takes is its image processor's
        (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 64, "width": 96}}))
    return model


def transformers_logits(folder, task: str, inputs: dict) -> np.ndarray:
    """What transformers itself computes on the checkpoint (its Auto class, nothing of aim's): the image
    logits (segmentation resized to the input, as its post-processor does), or the next-token logits
    of a whole prompt (the verification's inputs hold a cache; here the prompt is recomputed)."""
    import transformers

    auto = {
        "image-classification": transformers.AutoModelForImageClassification,
        "semantic-segmentation": transformers.AutoModelForSemanticSegmentation,
        "text-generation": transformers.AutoModelForCausalLM,
    }[task]
    model = auto.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        if task == "text-generation":
            return model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits[:, -1].numpy()
        logits = model(pixel_values=torch.from_numpy(inputs["pixel_values"])).logits
        if task == "semantic-segmentation":
            logits = torch.nn.functional.interpolate(
                logits, size=inputs["pixel_values"].shape[2:], mode="bilinear", align_corners=False
            )
        return logits.numpy()


def prompt_inputs(engine) -> dict:
    """A left-padded batch of two prompts as a prefill step (empty cache) of the engine."""
    from aim.generation.loop import prefill_inputs
    from aim.tasks.decoder_inputs import pad_left

    ids, mask = pad_left([[5, 90, 17, 42, 300, 77], [18, 2, 400]], pad_token_id=0)
    return prefill_inputs(engine, ids, mask)


@pytest.mark.parametrize(("task", "model_type"), CASES, ids=[f"{t}-{m}" for t, m in CASES])
def test_checkpoint_builds_and_verifies_without_a_model_name(tmp_path, task, model_type):
    folder = tmp_path / f"tiny-{model_type}"
    model = save_checkpoint(folder, task, model_type)
    manifest = build(CheckpointSource(folder), BuildRequest(tmp_path / "build"), log=lambda _: None).manifest

    assert manifest.folder == tmp_path / "build" / f"tiny-{model_type}"  # OUT/<the checkpoint folder's name>
    assert (manifest.task, manifest.verification.passed) == (task, True)
    assert (
        manifest.source.model_class == type(model).__name__
    )  # the class Optimum's table gives is transformers' Auto class's
    checks = {check.name: check for check in manifest.verification.checks}
    assert all(check.passed for check in checks.values()), [c for c in checks.values() if not c.passed]
    expected = {
        "bare model vs PyTorch",
        "utility noise ~ N(0,1)",
        "utility and focus noises independent",
        "identity at utility 0, focus 0",
    }
    if task == "text-generation":
        expected |= {"greedy tokens at utility 0 = PyTorch generate()", "KV cache vs full recompute"}
    assert expected <= set(checks)

    engine = OnnxRuntimeEngine(manifest.folder / FILES["engine"])
    tolerance = manifest.verification.tolerance
    if task == "text-generation":
        inputs = prompt_inputs(engine)
        feed = {k: v for k, v in inputs.items() if not k.startswith("past_key_values.")}
        assert "position_ids" in feed  # left padding: positions from the mask, as generate() gives them
        out = engine.run(inputs)
    else:
        inputs = Reference.load(manifest.folder / REFERENCE).inputs
        feed, out = inputs, engine.run(inputs)
        if model_type in FIXED_IMAGE_SIZE:  # static in the graph, at the checkpoint's size
            assert (
                manifest.graph.inputs[0].dims[2:]
                == list(inputs["pixel_values"].shape[2:])
                == ([64, 96] if model_type == "upernet" else [32, 32])
            )
        else:  # verified at another size than traced: a size baked into the graph would have failed
            assert inputs["pixel_values"].shape[2:] == tuple(
                get_task(task).verify_sizes[d] for d in ("height", "width")
            )
    np.testing.assert_allclose(out, transformers_logits(folder, task, feed), atol=tolerance.atol, rtol=tolerance.rtol)


# -- refusals and the architecture table, from config.json alone (no weights needed)


def write_config(folder, **config):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}, "refused: a state-space model"),
        (
            {"model_type": "llama", "architectures": ["LlamaModel"]},
            r"LlamaModel \(feature-extraction\), which has no logits",
        ),
        ({"model_type": "beit"}, "names no architecture.*serves several tasks"),
        ({"model_type": "bert", "architectures": ["BertForSequenceClassification"]}, "has no logits"),
        ({"architectures": ["LlamaForCausalLM"]}, "no model_type"),
    ],
)
def test_refused_architecture_says_why_and_what_is_supported(tmp_path, config, message):
    folder = write_config(tmp_path / "ckpt", **config)
    with pytest.raises(CheckpointError, match=message) as caught:
        build(CheckpointSource(folder), BuildRequest(tmp_path / "build"), log=lambda _: None)
    assert "Supported: image-classification: convnext" in str(caught.value)
    assert not (tmp_path / "build").exists()


def test_every_refusal_has_a_reason_and_is_not_also_tested():
    tested = {name for names in TESTED.values() for name in names}
    assert REFUSED and all(len(reason) > 20 for reason in REFUSED.values())
    assert not tested & set(REFUSED)


def test_an_untested_architecture_is_tried_with_a_note(tmp_path):
    folder = write_config(
        tmp_path / "my deit!", model_type="deit", architectures=["DeiTForImageClassification"], image_size=224
    )
    notes = []
    family = checkpoint_family(folder, notes.append)
    assert (family.name, family.task, family.model_class) == (
        "my-deit",
        "image-classification",
        "DeiTForImageClassification",
    )
    assert notes == ["note: deit is not among the tested architectures; the verification against PyTorch decides"]


def test_an_export_failure_is_a_refusal_for_an_untested_architecture_only(tmp_path, monkeypatch):
    """An untested architecture whose export fails is the user's error (exit 2, the supported list); the
    same failure on a tested one is a bug and keeps its traceback."""
    import transformers

    import aim.export.torch_export as torch_export

    def fails(*args, **kwargs):
        raise RuntimeError("an op the exporter lacks")

    monkeypatch.setattr(torch_export, "export_onnx", fails)
    config = transformers.DeiTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    transformers.DeiTForImageClassification(config).save_pretrained(tmp_path / "deit")
    with pytest.raises(
        CheckpointError,
        match=r"deit is not among the tested architectures, and its export failed \(RuntimeError: an op the "
        r"exporter lacks\)",
    ):
        build(CheckpointSource(tmp_path / "deit"), BuildRequest(tmp_path / "build"), log=lambda _: None)
    save_checkpoint(tmp_path / "resnet", "image-classification", "resnet")
    with pytest.raises(RuntimeError, match="an op the exporter lacks"):
        build(CheckpointSource(tmp_path / "resnet"), BuildRequest(tmp_path / "build"), log=lambda _: None)
    assert not (tmp_path / "build").exists() or list((tmp_path / "build").iterdir()) == []


def test_task_and_class_come_from_the_config(tmp_path):
    """The same model_type serves two tasks; the saved class decides (Optimum's mapping)."""
    both = [
        architecture_of({"model_type": "mobilenet_v2", "architectures": [name]})
        for name in ("MobileNetV2ForImageClassification", "MobileNetV2ForSemanticSegmentation")
    ]
    assert [(a.task, a.tested) for a in both] == [("image-classification", True), ("semantic-segmentation", True)]
    vit = architecture_of({"model_type": "vit", "architectures": ["ViTForImageClassification"]})
    assert vit.fixed_image_size and not both[0].fixed_image_size
    assert build_name(tmp_path / "a b") == "a-b"


def test_cli_engine_takes_a_checkpoint_without_a_model(tmp_path, capsys):
    from aim.cli import main

    folder = tmp_path / "my resnet"
    save_checkpoint(folder, "image-classification", "resnet", seed=3)
    assert main(["engine", "--checkpoint", str(folder), "--out", str(tmp_path / "build")]) == 0
    out = capsys.readouterr().out
    assert (
        "model my-resnet (image-classification, ResNetForImageClassification)" in out and "verification PASSED" in out
    )
    assert sorted(p.name for p in (tmp_path / "build").iterdir()) == ["my-resnet"]
    assert main(["export", "--checkpoint", str(folder), "-o", str(tmp_path / "resnet.onnx")]) == 0
    assert "exported my-resnet" in capsys.readouterr().out and (tmp_path / "resnet.onnx").is_file()
    for argv, message in (
        (
            ["engine", "--out", str(tmp_path / "none")],
            "give a model family (`aim engine MODEL`, see `aim models`), a checkpoint folder",
        ),
        (
            [
                "engine",
                "--checkpoint",
                str(write_config(tmp_path / "ssm", model_type="mamba")),
                "--out",
                str(tmp_path / "none"),
            ],
            "refused",
        ),
        (
            [
                "engine",
                "resnet",
                "--checkpoint",
                str(write_config(tmp_path / "q", model_type="qwen2")),
                "--out",
                str(tmp_path / "none"),
            ],
            "Leave MODEL out",
        ),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "none").exists()
