"""Hostile and careless use of the command line: every mistake of the user's ends with exit code 2 and
one `error:` line saying what was wrong (no traceback), nothing half-written is left, and a real bug
still shows its traceback."""

from __future__ import annotations

import dataclasses
import json
import resource
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import aim.families
from aim.cli import main
from aim.errors import AimError, InvalidInputError
from aim.layout import MANIFEST, Manifest
from aim.runtime.folder import ROLES, Build
from tests.conftest import link_or_copy, load, tiny_classifier

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class World:
    tmp: Path
    out: Path  # every output of a case goes under here; it must stay empty
    resnet: Path
    llama: Path
    tampered_tokenizer: Path  # llama, another eos_token in tokenizer_config.json
    swapped_engine: Path  # llama, engine.onnxruntime.onnx replaced by another graph
    swapped_resnet: Path
    edited_manifest: Path  # resnet, tolerance raised to 1e9 by hand

    def __getattr__(self, name):  # a file made by the fixture: world.rand_onnx -> tmp/rand.onnx
        return self.tmp / name.replace("_", ".", 1)


def linked_copy(source: Path, target: Path) -> Path:
    """A copy whose files are hard links (fast); change a file only by replacing it, never in place."""
    shutil.copytree(source, target, copy_function=link_or_copy)
    return target


def replace(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def model_of(nodes, inputs, outputs, opset=17, initializer=()):
    return helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializer)),
        opset_imports=[helper.make_opsetid("", opset)],
    )


def checkpoints(tmp: Path) -> None:
    """Checkpoint folders a user may hand over broken: a GPT-2 of 3,001 tokens that kept GPT-2's
    eos_token_id 50256 (no tokenizer, so generation would use it), a model.safetensors of random
    bytes, and one that is a link to a text file."""
    import transformers

    config = transformers.GPT2Config(vocab_size=3001, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp / "gpt2_eos")
    resnet = tmp / "resnet_checkpoint"
    load("resnet")[2].save_pretrained(resnet)
    for name in ("garbled", "linked"):
        linked_copy(resnet, tmp / name)
        (tmp / name / "model.safetensors").unlink()
    (tmp / "garbled" / "model.safetensors").write_bytes(np.random.default_rng(1).bytes(4096))
    (tmp / "linked" / "model.safetensors").symlink_to(ROOT / "README.md")


@pytest.fixture(scope="module")
def world(tmp_path_factory, build_folder) -> World:
    tmp = tmp_path_factory.mktemp("mistakes")
    (tmp / "rand.onnx").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp / "bad.npy").write_text("not an array")
    (tmp / "afile").write_text("a file where a folder should be")
    np.save(tmp / "empty.npy", np.zeros((0, 6), np.float32))
    np.save(tmp / "x.npy", np.zeros((3, 6), np.float32))
    np.save(tmp / "rows.npy", np.zeros((10_000, 6), np.float32))
    np.save(tmp / "image.npy", np.zeros((1, 3, 600, 600), np.float32))  # ResNet's range ends at 512
    mine = tiny_classifier(tmp / "mine.onnx")
    assert main(["modulate", str(mine), "-o", str(tmp / "mod.onnx"), "--logits", "scores"]) == 0

    model = onnx.load(str(mine))  # an int64 output of class ids beside the scores
    model.graph.node.append(helper.make_node("ArgMax", ["scores"], ["labels"], axis=1, keepdims=1))
    model.graph.output.append(helper.make_tensor_value_info("labels", TensorProto.INT64, ["batch", 1]))
    onnx.save(model, str(tmp / "int.onnx"))
    model = onnx.load(str(mine))
    model.opset_import[0].version = 23
    onnx.save(model, str(tmp / "opset23.onnx"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 5])
    onnx.save(
        model_of(
            [helper.make_node("Relu", ["x"], ["y"])],
            [x],
            [x, helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])],
        ),
        str(tmp / "pass.onnx"),
    )

    with open(tmp / "huge.npy", "wb") as handle:  # a header that claims 12 TB, over 64 bytes
        np.lib.format.write_array_header_1_0(
            handle, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 3 * 10**6)}
        )
        handle.write(bytes(64))
    with zipfile.ZipFile(tmp / "huge.npz", "w") as archive:  # the same claim inside an --inputs archive
        archive.write(tmp / "huge.npy", "x.npy")
    checkpoints(tmp)

    resnet, llama = build_folder("resnet"), build_folder("llama")
    tampered = linked_copy(llama, tmp / "tampered_tokenizer" / "llama")
    config = json.loads((tampered / "tokenizer" / "tokenizer_config.json").read_text())
    replace(tampered / "tokenizer" / "tokenizer_config.json", json.dumps({**config, "eos_token": "def"}).encode())
    swapped = linked_copy(llama, tmp / "swapped_engine" / "llama")
    replace(swapped / "engine.onnxruntime.onnx", (llama / "modulated.verify.onnx").read_bytes())
    swapped_resnet = linked_copy(resnet, tmp / "swapped_resnet" / "resnet")
    replace(swapped_resnet / "engine.onnxruntime.onnx", (resnet / "modulated.verify.onnx").read_bytes())
    edited = linked_copy(resnet, tmp / "edited_manifest" / "resnet")
    data = json.loads((edited / MANIFEST).read_text())
    data["verification"]["tolerance"].update(atol=1e9, rtol=1e9)
    replace(edited / MANIFEST, json.dumps(data, indent=2).encode())
    return World(tmp, tmp / "out", resnet, llama, tampered, swapped, swapped_resnet, edited)


# name -> (argv of world, what the error line must say)
CASES = {
    "engine: unknown model": (lambda w: ["engine", "alexnet", "--out", w.out], "unknown model 'alexnet'"),
    "engine: shell code in the name": (
        lambda w: ["engine", "resnet; echo x", "--out", w.out],
        "unknown model 'resnet; echo x'",
    ),
    "engine: OUT is a file": (lambda w: ["engine", "resnet", "--out", w.afile], "a file or folder is in the way"),
    "engine: no checkpoint folder": (
        lambda w: ["engine", "resnet", "--checkpoint", w.tmp / "nope", "--out", w.out],
        "no such folder",
    ),
    "engine: --seed -1": (lambda w: ["engine", "resnet", "--seed", "-1", "--out", w.out], "must be >= 0"),
    "engine: --precision fp8": (lambda w: ["engine", "resnet", "--precision", "fp8", "--out", w.out], "invalid choice"),
    "engine: eos_token_id past the vocabulary": (
        lambda w: ["engine", "--checkpoint", w.tmp / "gpt2_eos", "--out", w.out],
        "eos_token_id 50256 lies outside the model's vocabulary (vocab_size 3001",
    ),
    "engine: safetensors of random bytes": (
        lambda w: ["engine", "--checkpoint", w.tmp / "garbled", "--out", w.out],
        "model.safetensors is not a safetensors file: its header claims",
    ),
    "engine: safetensors a link to a text file": (
        lambda w: ["engine", "--checkpoint", w.tmp / "linked", "--out", w.out],
        "model.safetensors is not a safetensors file",
    ),
    "export: safetensors of random bytes": (
        lambda w: ["export", "-o", w.out / "m.onnx", "--checkpoint", w.tmp / "garbled"],
        "is not a safetensors file",
    ),
    "engine: --inputs whose array claims 12 TB": (
        lambda w: (
            ["engine", "--onnx", w.mine_onnx, "--logits", "scores", "--max-shapes", "x:8x6", "--out", w.out]
            + ["--inputs", w.huge_npz]
        ),
        "claims an array of shape (1000000, 3000000) float32 (12.0 TB), but the file holds",
    ),
    "engine: min batch 0": (
        lambda w: [
            "engine",
            "--onnx",
            w.mine_onnx,
            "--logits",
            "scores",
            "--min-shapes",
            "x:0x6",
            "--max-shapes",
            "x:8x6",
            "--out",
            w.out,
        ],
        "the minimum batch (axis 0) is 0",
    ),
    "build: min batch 0": (
        lambda w: [
            "build",
            w.mod_onnx,
            "-o",
            w.out / "e.plan",
            "--backend",
            "tensorrt-rtx",
            "--min-shapes",
            "x:0x6",
            "--max-shapes",
            "x:8x6",
        ],
        "the minimum batch (axis 0) is 0",
    ),
    "export: -o a folder": (lambda w: ["export", "resnet", "-o", w.tmp], "is a folder"),
    "export: -o under a file": (
        lambda w: ["export", "resnet", "-o", w.afile / "x.onnx"],
        "a file or folder is in the way",
    ),
    "modulate: random bytes": (
        lambda w: ["modulate", w.rand_onnx, "-o", w.out / "m.onnx"],
        "not a readable ONNX model",
    ),
    "modulate: no such file": (
        lambda w: ["modulate", w.tmp / "nope.onnx", "-o", w.out / "m.onnx"],
        "no such ONNX file",
    ),
    "modulate: int64 output": (
        lambda w: ["modulate", w.int_onnx, "-o", w.out / "m.onnx", "--logits", "labels"],
        "is int64: it holds class ids",
    ),
    "modulate: opset 23": (
        lambda w: ["modulate", w.opset23_onnx, "-o", w.out / "m.onnx", "--logits", "scores"],
        "opset 23",
    ),
    "modulate: logits are an input": (
        lambda w: ["modulate", w.pass_onnx, "-o", w.out / "m.onnx", "--logits", "x"],
        "also a graph input",
    ),
    "modulate: class axis 9": (
        lambda w: ["modulate", w.mine_onnx, "-o", w.out / "m.onnx", "--logits", "scores", "--class-axis", "9"],
        "out of range",
    ),
    "modulate: -o under a file": (
        lambda w: ["modulate", w.mine_onnx, "-o", w.afile / "m.onnx", "--logits", "scores"],
        "in the way",
    ),
    "build: random bytes": (lambda w: ["build", w.rand_onnx, "-o", w.out / "e.onnx"], "cannot load"),
    "build: TensorRT without --model": (
        lambda w: ["build", w.mod_onnx, "-o", w.out / "e.plan", "--backend", "tensorrt-rtx"],
        "or --model FAMILY",
    ),
    "build: --threads -3": (lambda w: ["build", w.mod_onnx, "-o", w.out / "e.onnx", "--threads", "-3"], "must be >= 1"),
    "trt-check: random bytes": (lambda w: ["trt-check", w.rand_onnx], "not a readable ONNX model"),
    "run: empty batch": (lambda w: ["run", w.mod_onnx, "--input", f"x={w.empty_npy}"], "hold no sample (batch 0"),
    "run: .npy header claims 12 TB": (
        lambda w: ["run", w.mod_onnx, "--input", f"x={w.huge_npy}"],
        "claims an array of shape (1000000, 3000000) float32 (12.0 TB), but the file holds",
    ),
    "run: corrupt .npy": (lambda w: ["run", w.mod_onnx, "--input", f"x={w.bad_npy}"], "not a readable .npy"),
    "run: --input without a name": (lambda w: ["run", w.mod_onnx, "--input", w.x_npy], "NAME=FILE.npy"),
    "run: image past the build's range": (
        lambda w: ["run", w.resnet, "--input", f"pixel_values={w.image_npy}"],
        "outside the range",
    ),
    "run: same, the engine file": (
        lambda w: ["run", w.resnet / "engine.onnxruntime.onnx", "--input", f"pixel_values={w.image_npy}"],
        "outside the range",
    ),
    "run: --utility nan, 10,000 rows": (
        lambda w: ["run", w.mod_onnx, "--input", f"x={w.rows_npy}", "--utility", "nan"],
        "utility must be finite",
    ),
    "run: --level, not calibrated": (
        lambda w: ["run", w.mod_onnx, "--input", f"x={w.x_npy}", "--level", "0.5"],
        "is not calibrated",
    ),
    "run: --boost 99=1": (
        lambda w: ["run", w.mod_onnx, "--input", f"x={w.x_npy}", "--boost", "99=1"],
        "class 99 is out of range",
    ),
    "run: --boost x=1": (
        lambda w: ["run", w.mod_onnx, "--input", f"x={w.x_npy}", "--boost", "x=1"],
        "takes CLASS=STRENGTH",
    ),
    "run: swapped engine": (
        lambda w: ["run", w.swapped_resnet, "--input", f"pixel_values={w.image_npy}"],
        "engine.onnxruntime.onnx in",
    ),
    "run: -o under a file": (
        lambda w: ["run", w.mod_onnx, "--input", f"x={w.x_npy}", "-o", w.afile / "y.npy"],
        "in the way",
    ),
    "verify: no build": (lambda w: ["verify", w.tmp], "no build there"),
    "verify: tolerance edited to 1e9": (lambda w: ["verify", w.edited_manifest], "edited after it was written"),
    "verify: tokenizer_config edited": (
        lambda w: ["verify", w.tampered_tokenizer],
        "tokenizer/tokenizer_config.json in",
    ),
    "generate: no --prompt": (lambda w: ["generate", w.llama], "required: --prompt"),
    "generate: empty prompt": (lambda w: ["generate", w.llama, "--prompt", ""], "prompt 1 ('') encodes to no tokens"),
    "generate: empty prompt in a batch": (
        lambda w: ["generate", w.llama, "--prompt", "hi", "--prompt", ""],
        "prompt 2 ('') encodes to no tokens",
    ),
    "generate: prompt past the range": (
        lambda w: ["generate", w.llama, "--prompt", "x = 1\n" * 700],
        "more than the 1024 this build takes",
    ),
    "generate: --max-new-tokens 100000": (
        lambda w: ["generate", w.llama, "--prompt", "hi", "--max-new-tokens", "100000"],
        "at most 1024 new tokens",
    ),
    "generate: --max-new-tokens 0": (
        lambda w: ["generate", w.llama, "--prompt", "hi", "--max-new-tokens", "0"],
        "must be >= 1",
    ),
    "generate: unknown focus word": (
        lambda w: ["generate", w.llama, "--prompt", "hi", "--focus", "+zqxjkvwy=5"],
        "not one token of this tokenizer",
    ),
    "generate: focus #-1": (
        lambda w: ["generate", w.llama, "--prompt", "hi", "--focus", "+#-1=5"],
        "#-1 is not a token id",
    ),
    "generate: focus #40000": (
        lambda w: ["generate", w.llama, "--prompt", "hi", "--focus", "+#40000=5"],
        "out of range",
    ),
    "generate: focus nan": (
        lambda w: ["generate", w.llama, "--prompt", "hi", "--focus", "-import=nan"],
        "must lie in [0, 10000]",
    ),
    "generate: --temperature -1": (
        lambda w: ["generate", w.llama, "--prompt", "hi", "--temperature", "-1"],
        "temperature must be >= 0",
    ),
    "generate: --temperature nan": (
        lambda w: ["generate", w.llama, "--prompt", "hi", "--temperature", "nan"],
        "temperature must be >= 0",
    ),
    "generate: --top-k -1": (lambda w: ["generate", w.llama, "--prompt", "hi", "--top-k", "-1"], "must be >= 0"),
    "generate: --seed -1": (lambda w: ["generate", w.llama, "--prompt", "hi", "--seed", "-1"], "must be >= 0"),
    "generate: tokenizer_config edited": (
        lambda w: ["generate", w.tampered_tokenizer, "--prompt", "hi"],
        "tokenizer/tokenizer_config.json in",
    ),
    "generate: swapped engine": (
        lambda w: ["generate", w.swapped_engine, "--prompt", "hi"],
        "engine.onnxruntime.onnx in",
    ),
    "train: --steps -1": (lambda w: ["train", "resnet", "--steps", "-1", "--out", w.out / "t"], "must be >= 1"),
    "train: --out a file": (lambda w: ["train", "resnet", "--out", w.afile], "in the way"),
    "train: unknown model": (lambda w: ["train", "alexnet", "--out", w.out / "t"], "unknown model"),
    "eval: --repeats 0": (lambda w: ["eval", "resnet", "--repeats", "0", "--out", w.out], "must be >= 1"),
    "eval: --boost -1": (lambda w: ["eval", "resnet", "--boost", "-1", "--out", w.out], "must be >= 0"),
    "eval: --out under a file": (lambda w: ["eval", "resnet", "--out", w.afile / "x"], "in the way"),
    "calibrate: unknown model": (lambda w: ["calibrate", "alexnet", "--out", w.out], "unknown model"),
    "triton: --max-queue-delay-us -5": (
        lambda w: ["triton", w.resnet, "--repository", w.out, "--max-queue-delay-us", "-5"],
        "must be >= 0",
    ),
    "triton: no build": (lambda w: ["triton", w.tmp, "--repository", w.out], "no build there"),
    "triton: repository is a file": (lambda w: ["triton", w.resnet, "--repository", w.afile], "in the way"),
    "triton: edited manifest": (
        lambda w: ["triton", w.edited_manifest, "--repository", w.out],
        "edited after it was written",
    ),
    "serve: --http-port -1": (lambda w: ["serve", w.tmp / "no-repository", "--http-port", "-1"], "1..65535"),
    "serve: no repository": (lambda w: ["serve", w.tmp / "no-repository"], "does not exist"),
    "serve: a repository without models": (lambda w: ["serve", w.tmp], "holds no model"),
}


def cli(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main([str(arg) for arg in argv])
    except SystemExit as exit:  # argparse
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("case", CASES)
def test_a_mistake_gets_one_error_line_and_leaves_nothing(world, case, capsys):
    argv, expected = CASES[case]
    world = dataclasses.replace(world, out=world.tmp / "out" / str(list(CASES).index(case)))  # each case its own
    code, _, err = cli(argv(world), capsys)
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1 and "error:" in err, err  # one line: argparse's usage not printed either
    assert expected in err, err
    assert len(err) < 2000  # a 10,000-row batch does not print its 10,000 values
    assert not world.out.exists(), sorted(world.out.rglob("*"))
    assert (world.afile).read_text() == "a file where a folder should be"


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only AimError and the OS errors of a user's paths and machine become `error:` lines."""

    def broken():
        raise KeyError("a bug")

    monkeypatch.setattr(aim.families, "list_families", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["models"])

    def bad_descriptor():
        raise OSError(9, "Bad file descriptor")  # EBADF: the program's, not the user's

    monkeypatch.setattr(aim.families, "list_families", bad_descriptor)
    with pytest.raises(OSError, match="Bad file descriptor"):
        main(["models"])
    bug = "import aim.families as f; f.list_families = lambda: 1 / 0; from aim.cli import main; main(['models'])"
    result = subprocess.run([sys.executable, "-c", bug], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr


def test_a_file_size_limit_mid_write_is_one_error_line_and_leaves_nothing(world):
    """The OS refuses a write halfway (RLIMIT_FSIZE: EFBIG, as a full disk gives ENOSPC): the temporary
    file is removed and the user reads one line."""
    out = world.tmp / "limited"
    out.mkdir()

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))  # 4 MB; the modulated llama is 16 MB

    argv = [sys.executable, "-m", "aim.cli", "modulate", str(world.llama / "exported.onnx"), "-o", str(out / "m.onnx")]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, preexec_fn=limit)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "File too large" in result.stderr and "free some space" in result.stderr
    assert list(out.iterdir()) == []


def test_what_generate_accepts(world, capsys):
    """Suppressing with "-word" through the CLI, which tokens a word acts on, and --truncate."""
    code, out, err = cli(
        ["generate", world.llama, "--prompt", "-x", "--focus", "-import=100", "--max-new-tokens", "2"], capsys
    )
    assert code == 0, err
    assert out.startswith("-x") and "focus -import=100 acts on ' import' (#" in err and "'import' (#" in err
    code, out, err = cli(
        ["generate", world.llama, "--prompt", "x = 1\n" * 700, "--max-new-tokens", "4", "--truncate"], capsys
    )
    assert code == 0 and "cut to their last 1021 tokens" in err, err


def test_every_runner_of_a_build_refuses_shapes_outside_its_range(world):
    """Bare, verification and production: each has the build's range, and a 600x600 image (ResNet's
    range ends at 512) is refused before it runs."""
    build = Build.open(world.resnet)
    manifest = build.manifest
    for runner in (build.runner(role, "onnxruntime") for role in ROLES):
        assert runner.profile["pixel_values"]["max"] == [manifest.dynamic_dims["batch"].max, 3, 512, 512]
        feed = {
            name: np.zeros([1 if dim == "batch" else 600 if isinstance(dim, str) else dim for dim in dims], dtype)
            for name, (dtype, dims) in runner.inputs.items()
        }
        with pytest.raises(InvalidInputError, match=r"'pixel_values' has shape \[1, 3, 600, 600\], outside the range"):
            runner.infer(feed)


def test_a_manifest_resealed_by_hand_is_still_caught_by_its_hashes(world):
    """The digest protects the manifest from edits; whoever reseals it (the Manifest API) still cannot
    swap an engine without its recorded hash failing."""
    folder = linked_copy(world.resnet, world.tmp / "resealed" / "resnet")
    manifest = Manifest.load(folder)
    manifest.verification.tolerance = type(manifest.verification.tolerance)(1e9, 1e9, "edited")
    manifest.save()
    assert Manifest.load(folder).verification.tolerance.atol == 1e9  # a sealed manifest reads back
    replace(folder / "engine.onnxruntime.onnx", (folder / "modulated.verify.onnx").read_bytes())
    with pytest.raises(AimError, match="changed since the build"):
        Build.open(folder)


def test_eval_refuses_a_class_the_model_lacks_before_the_sweeps(monkeypatch, capsys, tmp_path):
    from aim.evaluation import engine as evaluation

    class Engine:
        num_classes = 10

    def no_sweeps(*args, **kwargs):
        raise AssertionError("the sweeps started")

    monkeypatch.setattr(
        evaluation, "prepare_engine", lambda *args, **kwargs: SimpleNamespace(engine=Engine(), task=None)
    )
    monkeypatch.setattr(evaluation, "eval_inputs", no_sweeps)
    code, _, err = cli(["eval", "resnet", "--boost", "99", "--out", tmp_path], capsys)
    assert code == 2 and "--boost 99: the model has 10 classes (0..9)" in err, err


def test_train_refuses_its_folder_before_training(world, monkeypatch, capsys):
    from aim.evaluation import train

    class NoTraining:
        def __getattr__(self, name):
            raise AssertionError(f"training started ({name})")

    monkeypatch.setattr(train, "get_task", lambda name: NoTraining())
    code, _, err = cli(["train", "resnet", "--out", world.afile / "checkpoint"], capsys)
    assert code == 2 and "in the way" in err, err
