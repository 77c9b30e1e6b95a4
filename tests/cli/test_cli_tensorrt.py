"""The command line for TensorRT: the compatibility check names the refused node; a backend that cannot
work exits 2 with the reason and what to install, writing nothing."""

import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from aim.cli import main
from aim.runtime import tensorrt as trt_engine
from tests.conftest import tiny_classifier

ROOT = Path(__file__).resolve().parents[1]


def test_trt_check_passes_a_good_graph_and_names_a_refused_node(tmp_path, capsys):
    good = tiny_classifier(tmp_path / "good.onnx")
    assert main(["trt-check", str(good)]) == 0
    assert "all supported" in capsys.readouterr().out
    graph = h.make_graph(
        [h.make_node("ScatterND", ["x", "i", "u"], ["y"], name="scatter_mul", reduction="mul")],
        "g",
        [
            h.make_tensor_value_info("x", T.FLOAT, [2, 4]),
            h.make_tensor_value_info("i", T.INT64, [1, 1]),
            h.make_tensor_value_info("u", T.FLOAT, [1, 4]),
        ],
        [h.make_tensor_value_info("y", T.FLOAT, [2, 4])],
    )
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(tmp_path / "bad.onnx"))
    assert main(["trt-check", str(tmp_path / "bad.onnx")]) == 1
    out = capsys.readouterr().out
    assert "1 unsupported" in out and "'scatter_mul' (ScatterND)" in out and "reduction" in out


def test_engine_with_an_unusable_tensorrt_backend_exits_2_and_writes_nothing(tmp_path):
    gpu, why = trt_engine.cuda_gpu_available()
    if gpu:
        pytest.skip(
            f"this machine can run TensorRT ({why}); tests/engines/test_pipeline_tensorrt.py covers a missing module"
        )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "aim.cli",
            "engine",
            "resnet",
            "--backend",
            "tensorrt",
            "--out",
            str(tmp_path / "build"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "tensorrt" in result.stderr and ("pip install" in result.stderr or "BACKEND=tensorrt-rtx" in result.stderr)
    assert not (tmp_path / "build").exists()


def test_build_a_tensorrt_plan_from_any_onnx_file(tmp_path, capsys):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed (pip install -e '.[rtx]')")
    source = tiny_classifier(tmp_path / "classifier.onnx")  # dims: batch, named like the families' batch
    plan = tmp_path / "classifier.plan"
    assert main(["build", str(source), "-o", str(plan), "--backend", "tensorrt-rtx", "--model", "llama"]) == 0
    out = capsys.readouterr().out
    assert plan.is_file() and plan.stat().st_size > 0 and "profile x: min [1, 6], opt [2, 6], max [8, 6]" in out
    assert main(["build", str(source), "-o", str(plan), "--backend", "tensorrt-rtx"]) == 2
    assert "--model" in capsys.readouterr().err
