"""`aim engine --onnx`: a model the project did not export, all the way to a verified build folder, a
TensorRT for RTX plan, a Triton repository the real server loads, and a calibrated engine.

The model is a small PyTorch module exported by plain torch.onnx, with names unlike the families':
input `image` whose batch is `n` and whose height and width are dynamic, and two outputs, the logits
`scores` second. The reference for the folder is the ONNX file on ONNX Runtime; PyTorch (the module
itself) is the independent check that the right output was taken and the engine computes the model.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from aim.cli import main
from aim.layout import Manifest
from aim.runtime.onnxruntime import OnnxRuntimeEngine
from aim.specs import DimRange
from aim.verify.reference import Reference
from tests.graph_passes.test_redistribution import fp16_conv_classifier

CLASSES = 10
SHAPES = ["--min-shapes", "image:1x3x16x16", "--opt-shapes", "image:4x3x32x32", "--max-shapes", "image:16x3x64x64"]


class Scorer(torch.nn.Module):
    """features [n, 16] and scores [n, 10] from images of any size."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.head = torch.nn.Linear(16, CLASSES)

    def forward(self, image):
        features = torch.relu(self.conv(image)).mean((2, 3))
        return features, self.head(features)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    """(module, path of its ONNX) exported by plain torch.onnx."""
    folder = tmp_path_factory.mktemp("yours")
    torch.manual_seed(0)
    module = Scorer().eval()
    path = folder / "scorer.onnx"
    torch.onnx.export(
        module,
        (torch.randn(2, 3, 32, 32),),
        str(path),
        input_names=["image"],
        output_names=["features", "scores"],
        dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}, "features": {0: "n"}, "scores": {0: "n"}},
        dynamo=False,
    )
    return module, path


@pytest.fixture(scope="module")
def built(scorer, tmp_path_factory):
    """The ONNX Runtime build folder of the scorer, made by the CLI."""
    _, path = scorer
    out = tmp_path_factory.mktemp("out")
    assert (
        main(
            [
                "engine",
                "--onnx",
                str(path),
                "--logits",
                "scores",
                "--out",
                str(out),
                "--backend",
                "onnxruntime",
                *SHAPES,
            ]
        )
        == 0
    )
    return out / "scorer"


def test_the_build_folder_is_the_families_one(scorer, built):
    module, path = scorer
    manifest = Manifest.load(built)
    assert manifest.model == "scorer" and manifest.task == "image-classification" and manifest.backend == "onnxruntime"
    assert manifest.source.onnx == str(path.resolve())
    assert manifest.source.onnx_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest.source.shapes == {"min": "image:1x3x16x16", "opt": "image:4x3x32x32", "max": "image:16x3x64x64"}
    assert manifest.changed_artifacts() == []
    assert {"exported", "bare", "modulated", "verification", "engine", "reference"} <= set(manifest.artifacts)
    every_file = {str(p.relative_to(built)) for p in built.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert {entry.path for entry in manifest.artifacts.values()} == every_file  # the folder holds nothing unrecorded
    # The user's dims under the folder's names: the batch is `batch`, h and w keep theirs; logits first.
    assert manifest.dynamic_dims == {"batch": DimRange(1, 4, 16), "h": DimRange(16, 32, 64), "w": DimRange(16, 32, 64)}
    assert [(t.name, t.dims) for t in manifest.graph.inputs] == [
        ("image", ["batch", 3, "h", "w"]),
        ("utility", ["batch"]),
        ("focus", ["batch", CLASSES]),
    ]
    assert [t.name for t in manifest.graph.outputs] == ["scores", "features"]
    assert manifest.profile["image"] == {"min": [1, 3, 16, 16], "opt": [4, 3, 32, 32], "max": [16, 3, 64, 64]}
    assert manifest.profile["focus"] == {"min": [1, CLASSES], "opt": [4, CLASSES], "max": [16, CLASSES]}
    assert manifest.modulation.logits == "scores" and manifest.modulation.num_classes == CLASSES
    verification = manifest.verification
    assert verification.passed and verification.engine_run.ran
    names = [check.name for check in verification.checks]
    assert names[:2] == [
        "bare model vs bare ONNX on ONNX Runtime",
        "modulated (verification flavour) vs bare ONNX on ONNX Runtime reference",
    ]
    assert "identity at utility 0, focus 0" in names and "utility noise ~ N(0,1)" in names and len(names) == 10

    # The reference is the ONNX file's logits for inputs drawn from its types and shapes (opt size),
    # and they are the module's own `scores`, not its first output.
    reference = Reference.load(built / "reference.npz")
    assert reference.source == "bare ONNX on ONNX Runtime"
    image = reference.inputs["image"]
    assert image.shape == (4, 3, 32, 32) and image.dtype == np.float32
    with torch.no_grad():
        expected = module(torch.from_numpy(image))[1].numpy()
    np.testing.assert_allclose(reference.logits, expected, rtol=1e-5, atol=1e-5)  # ONNX Runtime vs PyTorch, fp32
    with OnnxRuntimeEngine(manifest.engine_path()) as engine:
        np.testing.assert_array_equal(engine.run({"image": image}, 0.0), reference.logits)
        np.testing.assert_allclose(
            engine.run({"image": image[:1, :, :48, :20]}),
            module(torch.from_numpy(image[:1, :, :48, :20]))[1].detach().numpy(),
            rtol=1e-5,
            atol=1e-5,
        )

    assert main(["verify", str(built)]) == 0  # the folder re-verifies from its manifest alone


def test_a_dynamic_dim_without_a_range_is_named_and_nothing_is_written(scorer, tmp_path, capsys):
    _, path = scorer
    out = tmp_path / "out"
    assert (
        main(
            [
                "engine",
                "--onnx",
                str(path),
                "--logits",
                "scores",
                "--out",
                str(out),
                "--max-shapes",
                "image:8x3x32x32,pixels:1x3",
            ]
        )
        == 2
    )
    assert (
        "the shape flags name ['pixels'], which is not an input of the graph (inputs: ['image'])"
        in capsys.readouterr().err
    )
    assert main(["engine", "--onnx", str(path), "--logits", "scores", "--out", str(out)]) == 2
    assert "input 'image' axis 0 has dynamic dim 'n', which has no range" in capsys.readouterr().err
    assert (
        main(
            ["engine", "--onnx", str(path), "--logits", "logits", "--out", str(out), "--max-shapes", "image:8x3x32x32"]
        )
        == 2
    )
    assert "no output named 'logits'; its outputs are ['features', 'scores']" in capsys.readouterr().err
    assert (
        main(
            [
                "engine",
                "--onnx",
                str(path),
                "--logits",
                "scores",
                "--out",
                str(out),
                "--max-shapes",
                "image:8x3x32x32",
                "--class-axis",
                "0",
            ]
        )
        == 2
    )
    assert "class axis 0 is out of range" in capsys.readouterr().err
    assert not out.exists()


def test_tensorrt_rtx_plans_with_the_flags_profile(scorer, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed: pip install -e '.[rtx]'")
    _, path = scorer
    assert (
        main(
            [
                "engine",
                "--onnx",
                str(path),
                "--logits",
                "scores",
                "--out",
                str(tmp_path),
                "--backend",
                "tensorrt-rtx",
                *SHAPES,
            ]
        )
        == 0
    )
    manifest = Manifest.load(tmp_path / "scorer")
    assert manifest.engine == "engine.tensorrt-rtx.plan" and set(manifest.tensorrt) == {
        "engine",
        "engine.bare",
        "engine.verification",
    }
    for build in manifest.tensorrt.values():
        assert (tmp_path / "scorer" / build["path"]).stat().st_size == build["bytes"] > 10_000
    assert manifest.tensorrt["engine"]["profile"] == manifest.profile
    assert manifest.tensorrt["engine"]["profile"]["image"] == {
        "min": [1, 3, 16, 16],
        "opt": [4, 3, 32, 32],
        "max": [16, 3, 64, 64],
    }
    assert manifest.tensorrt["engine.verification"]["profile"]["noise_utility"]["max"] == [
        16,
        CLASSES,
    ]  # follows the logits
    assert manifest.verification.passed
    # `aim build` takes the same flags for a graph modulated by hand.
    plan = tmp_path / "by-hand.plan"
    assert (
        main(
            [
                "build",
                str(manifest.path("modulated")),
                "-o",
                str(plan),
                "--backend",
                "tensorrt-rtx",
                "--max-shapes",
                "image:2x3x32x32",
            ]
        )
        == 0
    )
    assert plan.stat().st_size > 10_000


def test_triton_serves_the_folder(built, tmp_path):
    import tritonclient.http as httpclient
    from tritonclient.utils import np_to_triton_dtype

    from aim.serving.server import TritonServer
    from aim.serving.triton import read_config, write_model
    from tests.serving.conftest import _server_can_run

    model = write_model(built, tmp_path / "repository")
    config = read_config(model)
    assert config.name == "scorer" and config.max_batch_size == 16
    assert [(i.name, list(i.dims)) for i in config.input] == [
        ("image", [3, -1, -1]),
        ("utility", [1]),
        ("focus", [CLASSES]),
    ]
    reason = _server_can_run()
    if reason:
        pytest.skip(reason)
    image = np.random.default_rng(1).normal(size=(3, 3, 24, 40)).astype(np.float32)
    with OnnxRuntimeEngine(Manifest.load(built).graph_path("bare")) as bare:
        expected = bare.run({"image": image})
    with TritonServer(tmp_path / "repository", log_path=tmp_path / "triton.log") as server:
        client = httpclient.InferenceServerClient(server.http_url)

        def infer(utility):
            tensors = []
            for name, array in (
                ("image", image),
                ("utility", np.full((3, 1), utility, np.float32)),
                ("focus", np.zeros((3, CLASSES), np.float32)),
            ):
                tensors.append(httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype)))
                tensors[-1].set_data_from_numpy(array)
            return client.infer("scorer", tensors).as_numpy("scores")

        np.testing.assert_array_equal(infer(0.0), expected)  # utility 0: the bare model, bit for bit
        assert np.all(infer(2.0) != expected)
        client.close()


def test_calibrated_engine_keeps_the_agreement_the_theory_predicts(built, tmp_path):
    """The level -> sigma table inverted on the user's unlabelled inputs, applied by the calibrated
    engine: the agreement measured through it at level 0.5 matches G(sigma) of theory.py computed from
    the bare logits of the same inputs (a Monte-Carlo error only: 4 standard errors, a false alarm
    about once in 16,000 runs; a table not applied (level read as sigma) misses by > 0.3)."""
    import onnxruntime

    from aim.evaluation import theory

    data = np.random.default_rng(2).normal(size=(160, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "unlabeled.npy", data)
    assert main(["calibrate", str(built), "--data", str(tmp_path / "unlabeled.npy")]) == 0
    manifest = Manifest.load(built)
    calibration = manifest.calibration
    assert calibration["calibration_set"]["inputs"] == 128 and calibration["check"]["inputs"] == 32
    assert (
        calibration["calibration_set"]["sha256"]
        == hashlib.sha256((tmp_path / "unlabeled.npy").read_bytes()).hexdigest()
    )
    assert json.loads((built / "calibration.json").read_text())["sigmas"] == calibration["sigmas"]
    sigma = calibration["sigmas"][calibration["levels"].index(0.5)]
    with OnnxRuntimeEngine(manifest.graph_path("bare")) as bare:
        clean = np.concatenate([bare.run({"image": data[i : i + 16]}) for i in range(0, 160, 16)])
    p = theory.win_probability(clean, clean.argmax(1), sigma, class_axis=1)
    onnxruntime.set_seed(3)  # before the session
    repeats = 20
    with OnnxRuntimeEngine(manifest.path("calibrated_engine")) as engine:
        assert engine.calibrated
        np.testing.assert_array_equal(
            engine.run({"image": data[:16]}, level=1.0), clean[:16]
        )  # level 1: the exact model
        agree = np.mean(
            [
                np.mean(
                    np.concatenate(
                        [engine.run({"image": data[i : i + 16]}, level=0.5) for i in range(0, 160, 16)]
                    ).argmax(1)
                    == clean.argmax(1)
                )
                for _ in range(repeats)
            ]
        )
    standard_error = np.sqrt(np.mean(p * (1 - p)) / (p.size * repeats))
    assert abs(agree - p.mean()) < 4 * standard_error, (agree, p.mean(), standard_error)
    assert abs(p.mean() - 0.55) < 0.05  # level 0.5 targets 1/C + 0.5 (1 - 1/C) on the calibration rows


def test_fp16_onnx_stays_bit_exact_and_given_inputs_are_used(tmp_path):
    """An ONNX that is FP16 already: utility 0 gives its logits bit for bit (ONNX Runtime used to round
    a moved logits producer's inputs differently: 32% of values were off), verified on --inputs."""
    source = fp16_conv_classifier(tmp_path / "half.onnx")
    image = np.random.default_rng(5).normal(size=(3, 3, 8, 8)).astype(np.float16)
    np.savez(tmp_path / "data.npz", image=image)
    out = tmp_path / "out"
    args = [
        "engine",
        "--onnx",
        str(source),
        "--logits",
        "scores",
        "--out",
        str(out),
        "--min-shapes",
        "image:1x3x8x8",
        "--max-shapes",
        "image:8x3x8x8",
    ]
    assert main([*args, "--inputs", str(tmp_path / "data.npz")]) == 0
    manifest = Manifest.load(out / "half")
    assert manifest.precision == "fp16" and manifest.verification.reduced_precision.metric == "top_k"
    assert manifest.source.inputs["sha256"] == hashlib.sha256((tmp_path / "data.npz").read_bytes()).hexdigest()
    assert next(c for c in manifest.verification.checks if c.name.startswith("identity")).passed
    np.testing.assert_array_equal(Reference.load(out / "half" / "reference.npz").inputs["image"], image)
    many = np.random.default_rng(6).normal(size=(8, 3, 8, 8)).astype(np.float16)
    with OnnxRuntimeEngine(source) as bare, OnnxRuntimeEngine(manifest.engine_path()) as engine:
        np.testing.assert_array_equal(engine.run({"image": many}, 0.0), bare.run({"image": many}))


def test_fp16_precision_of_an_fp32_onnx_keeps_the_redistribution_fp32(scorer, tmp_path):
    import onnx

    from aim.graph_passes.fp16 import fp32_violations

    _, path = scorer
    assert (
        main(
            [
                "engine",
                "--onnx",
                str(path),
                "--logits",
                "scores",
                "--out",
                str(tmp_path),
                "--precision",
                "fp16",
                *SHAPES,
            ]
        )
        == 0
    )
    manifest = Manifest.load(tmp_path / "scorer")
    assert manifest.graphs["production"] == "modulated.fp16" and manifest.verification.passed
    reduced = manifest.verification.reduced_precision
    assert (reduced.metric, reduced.k, reduced.min_fraction) == ("top_k", 5, 0.9)  # image-classification's comparator
    differential = manifest.verification.checks[:2]
    assert all(check.metrics["agreement"] >= 0.9 for check in differential)
    assert fp32_violations(onnx.load(str(manifest.graph_path("production")))) == []


def test_calibrate_onnx_reuses_the_build_of_that_file(scorer, built, tmp_path, capsys):
    _, path = scorer
    np.save(tmp_path / "few.npy", np.random.default_rng(7).normal(size=(10, 3, 16, 16)).astype(np.float32))
    created = Manifest.load(built).created
    args = [
        "calibrate",
        "--onnx",
        str(path),
        "--logits",
        "scores",
        "--out",
        str(built.parent),
        "--data",
        str(tmp_path / "few.npy"),
    ]
    assert main(args) == 0
    assert f"engine reused: {built}" in capsys.readouterr().out
    manifest = Manifest.load(built)
    assert manifest.created == created and manifest.calibration["calibration_set"]["inputs"] == 8
    assert main(["calibrate", str(built)]) == 2  # a folder needs --data
    assert "--data" in capsys.readouterr().err


def test_keyed_noise_on_your_onnx_is_verified_against_the_twin_and_keeps_its_key(scorer, tmp_path):
    """`make engine ONNX=... NOISE=keyed NOISE_KEY=file`: the keyed checks replace the fresh ones, the
    manifest names the key by its fingerprint, and the same request gets the same answer."""
    from aim.graph_passes.noise_key import NoiseKey
    from aim.runtime.folder import Build

    module, path = scorer
    key = tmp_path / "owner.key"
    argv = [
        "engine",
        "--onnx",
        str(path),
        "--logits",
        "scores",
        "--out",
        str(tmp_path),
        "--noise",
        "keyed",
        "--noise-key",
        str(key),
        *SHAPES,
    ]
    assert main(argv) == 0
    manifest = Manifest.load(tmp_path / "scorer")
    checks = {check.name: check for check in manifest.verification.checks}
    assert manifest.verification.passed and "keyed production vs PyTorch twin (element-wise)" in checks, checks
    assert (
        manifest.modulation.noise == "keyed" and manifest.modulation.key_fingerprint == NoiseKey.read(key).fingerprint
    )
    image = np.random.default_rng(1).normal(size=(3, 3, 32, 32)).astype(np.float32)
    engine = Build(manifest).runner("production")
    with engine:
        first = engine.run({"image": image}, 3.0)
        assert np.array_equal(first, engine.run({"image": image}, 3.0))
        with torch.no_grad():
            clean = module(torch.from_numpy(image))[1].numpy()
        assert np.allclose(engine.run({"image": image}, 0.0), clean, atol=1e-5) and not np.allclose(
            first, clean, atol=0.5
        )


def test_an_onnx_with_external_weights_builds_with_every_file_recorded(scorer, tmp_path):
    """Weights in a file beside the graph are copied into the build and recorded with their hash, so
    `aim verify` would notice them changed."""
    import onnx

    _, path = scorer
    model = onnx.load(str(path))
    mine = tmp_path / "yours" / "scorer.onnx"
    mine.parent.mkdir()
    onnx.save(
        model,
        str(mine),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="scorer.weights",
        size_threshold=0,
    )
    assert main(["engine", "--onnx", str(mine), "--logits", "scores", "--out", str(tmp_path / "out"), *SHAPES]) == 0
    folder = tmp_path / "out" / "scorer"
    manifest = Manifest.load(folder)
    every_file = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert any(name.endswith(".data") or name.endswith(".weights") for name in every_file), every_file
    assert {entry.path for entry in manifest.artifacts.values()} == every_file


class Segmenter(torch.nn.Module):
    """masks [n, 5, h/2, w/2]: per-pixel class scores at half the image's resolution."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1)

    def forward(self, photo):
        return self.conv(photo)


def test_upsample_to_modulates_your_segmenter_per_input_pixel(tmp_path, capsys):
    """`make engine ONNX=seg.onnx LOGITS=masks TASK=semantic-segmentation UPSAMPLE_TO=photo`: the engine's
    logits are the module's, resized as PyTorch's bilinear interpolation resizes them, at the input's
    size; noise then lands on every input pixel; a wrong input name is refused with the inputs named."""
    torch.manual_seed(0)
    module = Segmenter().eval()
    path = tmp_path / "seg.onnx"
    torch.onnx.export(
        module,
        (torch.randn(1, 3, 32, 32),),
        str(path),
        input_names=["photo"],
        output_names=["masks"],
        dynamic_axes={"photo": {0: "n", 2: "h", 3: "w"}, "masks": {0: "n", 2: "mh", 3: "mw"}},
        dynamo=False,
    )
    shapes = ["--min-shapes", "photo:1x3x16x16", "--opt-shapes", "photo:2x3x32x32", "--max-shapes", "photo:4x3x64x64"]
    args = [
        "engine",
        "--onnx",
        str(path),
        "--logits",
        "masks",
        "--task",
        "semantic-segmentation",
        "--out",
        str(tmp_path / "out"),
        *shapes,
    ]
    assert main([*args, "--upsample-to", "image"]) == 2
    assert "'image' is not an input" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main([*args, "--upsample-to", "photo"]) == 0
    manifest = Manifest.load(tmp_path / "out" / "seg")
    assert manifest.verification.passed and manifest.modulation.upsampled_to == "photo"
    photo = np.random.default_rng(2).normal(size=(2, 3, 40, 24)).astype(np.float32)
    with torch.no_grad():
        expected = torch.nn.functional.interpolate(
            module(torch.from_numpy(photo)), size=(40, 24), mode="bilinear", align_corners=False
        ).numpy()
    with OnnxRuntimeEngine(manifest.engine_path()) as engine:
        clean = engine.run({"photo": photo}, 0.0)
        np.testing.assert_allclose(clean, expected, rtol=1e-5, atol=1e-5)
        noise = engine.run({"photo": photo}, 1.0) - clean
    assert noise.shape == (2, 5, 40, 24) and 0.9 < noise.std() < 1.1  # N(0, 1) on every input pixel
    assert np.abs(noise[:, :, 0::2, 0::2] - noise[:, :, 1::2, 1::2]).min() > 0  # not upsampled low-res noise


def test_tensorrt_rtx_builds_your_segmenter_once_its_logits_are_resized_to_the_input(tmp_path, capsys):
    """Logits at half the image's size have dims no input has, which TensorRT for RTX cannot build the
    verification flavour of; resized by --upsample-to, they are the input's, and the plans build."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed: pip install -e '.[rtx]'")
    torch.manual_seed(0)
    path = tmp_path / "seg.onnx"
    torch.onnx.export(
        Segmenter().eval(),
        (torch.randn(1, 3, 32, 32),),
        str(path),
        input_names=["photo"],
        output_names=["masks"],
        dynamic_axes={"photo": {0: "n", 2: "h", 3: "w"}, "masks": {0: "n", 2: "mh", 3: "mw"}},
        dynamo=False,
    )
    args = [
        "engine",
        "--onnx",
        str(path),
        "--logits",
        "masks",
        "--task",
        "semantic-segmentation",
        "--out",
        str(tmp_path),
        "--backend",
        "tensorrt-rtx",
        "--max-shapes",
        "photo:2x3x32x32",
        "--min-shapes",
        "photo:1x3x16x16",
    ]
    assert main(args) == 2 and "which is no input's dim" in capsys.readouterr().err
    assert main([*args, "--upsample-to", "photo"]) == 0
    manifest = Manifest.load(tmp_path / "seg")
    assert (
        manifest.engine.endswith(".plan")
        and manifest.verification.passed
        and manifest.modulation.upsampled_to == "photo"
    )
