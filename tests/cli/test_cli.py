"""The command line: thin over the API, clear errors with exit code 2, nothing half-written."""

import subprocess
import sys
from pathlib import Path

import numpy as np

from aim.cli import main
from tests.conftest import tiny_classifier

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_model_lists_models_and_writes_nothing(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "aim.cli", "engine", "nonexistent", "--out", str(tmp_path / "build")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "unknown model 'nonexistent'" in result.stderr and "llama, resnet, segformer" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "build").exists()


def test_models_lists_every_family(capsys):
    assert main(["models"]) == 0
    families = capsys.readouterr().out.split("\n\n")[0]
    assert [line.split()[0] for line in families.splitlines()] == ["llama", "resnet", "segformer"]


def test_modulate_build_run_on_a_model_you_bring(tmp_path, capsys):
    source = tiny_classifier(tmp_path / "mine.onnx")
    assert main(["modulate", str(source), "-o", str(tmp_path / "mod.onnx"), "--logits", "scores"]) == 0
    assert main(["build", str(tmp_path / "mod.onnx"), "-o", str(tmp_path / "engine.onnx")]) == 0
    x = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    run = ["run", str(tmp_path / "engine.onnx"), "--input", f"x={tmp_path / 'x.npy'}"]
    assert main(run + ["-o", str(tmp_path / "clean.npy")]) == 0
    assert main(run + ["--boost", "2=1000", "-o", str(tmp_path / "boosted.npy")]) == 0
    clean, boosted = np.load(tmp_path / "clean.npy"), np.load(tmp_path / "boosted.npy")
    assert clean.shape == (3, 5) and np.all(np.argmax(boosted, axis=1) == 2)
    assert main(run + ["--suppress", "9=1"]) == 2
    assert "class 9 is out of range" in capsys.readouterr().err


def test_bad_inputs_exit_2_with_the_reason(tmp_path, capsys):
    source = tiny_classifier(tmp_path / "mine.onnx")
    cases = [
        (
            ["modulate", str(source), "-o", str(tmp_path / "out" / "a.onnx"), "--logits", "logits"],
            "no output named 'logits'",
        ),
        (
            [
                "modulate",
                str(source),
                "-o",
                str(tmp_path / "out" / "b.onnx"),
                "--logits",
                "scores",
                "--class-axis",
                "3",
            ],
            "out of range",
        ),
        (["modulate", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "out" / "c.onnx")], "no such ONNX file"),
        (["build", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "out" / "d.onnx")], "no such"),
        (["run", str(source), "--utility", "nan"], "not modulated"),
        (["verify", str(tmp_path)], "no build there"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    modulated = tmp_path / "mod.onnx"
    assert main(["modulate", str(source), "-o", str(modulated), "--logits", "scores"]) == 0
    np.save(tmp_path / "x.npy", np.zeros((2, 6), np.float32))
    for utility, message in [("nan", "finite"), ("-1", "must lie in [0, 10000]"), ("inf", "finite")]:
        assert main(["run", str(modulated), "--input", f"x={tmp_path / 'x.npy'}", "--utility", utility]) == 2
        assert message in capsys.readouterr().err
