"""aim modulate --noise keyed on a model you bring: a deterministic engine that TensorRT for RTX builds,
its key kept in the file asked for, and mistakes refused with exit code 2."""

import os
import stat

import numpy as np
import pytest

from aim.cli import main
from aim.graph_passes.noise_key import NoiseKey
from aim.runtime.onnxruntime import OnnxRuntimeEngine
from tests.conftest import tiny_classifier


def test_modulate_keyed_gives_the_same_answer_and_keeps_its_key(tmp_path, capsys):
    source = tiny_classifier(tmp_path / "mine.onnx")
    key = tmp_path / "owner.key"
    argv = [
        "modulate",
        str(source),
        "-o",
        str(tmp_path / "keyed.onnx"),
        "--logits",
        "scores",
        "--noise",
        "keyed",
        "--noise-key",
        str(key),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"fingerprint {NoiseKey.read(key).fingerprint}" in out and f"saved to {key}" in out
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    engine = OnnxRuntimeEngine(tmp_path / "keyed.onnx")
    x = {"x": np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)}
    first = engine.run(x, 4.0)
    assert np.array_equal(first, engine.run(x, 4.0)) and not np.array_equal(first, engine.run(x, 0.0))
    assert main(argv[:3] + [str(tmp_path / "again.onnx")] + argv[4:]) == 0  # the same key: the same graph
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "keyed.onnx").read_bytes()


def test_keyed_mistakes_exit_2_and_write_nothing(tmp_path, capsys):
    source = tiny_classifier(tmp_path / "mine.onnx")
    (tmp_path / "bad.key").write_text("zz")
    modulate = ["modulate", str(source), "-o", str(tmp_path / "out.onnx"), "--logits", "scores"]
    for extra, message in [
        (["--noise-key", str(tmp_path / "k.key")], "is for keyed noise"),
        (["--noise", "keyed", "--noise-key", str(tmp_path / "bad.key")], "is not a noise key"),
    ]:
        assert main(modulate + extra) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_code:  # argparse refuses an unknown noise itself
        main(modulate + ["--noise", "secret"])
    assert exit_code.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "k.key").exists()


@pytest.mark.parametrize("dims", [["batch", 6], ["batch", 3, 8, 8]], ids=["classes", "pixels"])
def test_tensorrt_rtx_builds_the_keyed_graph(tmp_path, dims):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed (pip install -e '.[rtx]')")
    from aim.graph_passes.io import load_graph, save_onnx
    from aim.graph_passes.redistribution import add_redistribution
    from tests.graph_passes.test_redistribution import identity_model

    graph = add_redistribution(
        load_graph(identity_model(tmp_path / "identity.onnx", dims)), "logits", 1, key=NoiseKey.draw()
    )
    save_onnx(graph, tmp_path / "keyed.onnx")
    plan = tmp_path / "keyed.plan"
    assert (
        main(
            [
                "build",
                str(tmp_path / "keyed.onnx"),
                "-o",
                str(plan),
                "--backend",
                "tensorrt-rtx",
                "--model",
                "segformer",
            ]
        )
        == 0
    )
    assert plan.stat().st_size > 0
