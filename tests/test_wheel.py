"""Rule 5: the wheel works alone, installed outside the source tree.

- Beside the pinned dependencies (the test environment's own, put on the path of a fresh virtual
  environment by a .pth file: no second multi-GB install), `aim models`, `aim trt-check` and
  `aim engine resnet` run from another folder, importing `aim` from the wheel, not from this tree.
- In a fresh virtual environment holding only numpy, onnx and onnxruntime besides the wheel, `aim run`
  runs an ONNX Runtime engine: the runtime needs no torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_PINS = ("numpy", "onnx", "onnxruntime")


def run(command, cwd, **kwargs):
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, env=env, **kwargs)


def pin(name: str) -> str:
    """The version pyproject.toml pins for a dependency."""
    import tomllib

    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(dep for dep in dependencies if dep.split("==")[0] == name)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    done = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, ROOT], cwd=out
    )
    assert done.returncode == 0, done.stderr
    (path,) = out.glob("aim_modulation-*.whl")
    return path


def venv(folder: Path, wheel: Path, *packages: str, beside_pins: bool = False) -> Path:
    """A fresh virtual environment with the wheel (no dependencies) and `packages` installed."""
    done = run([sys.executable, "-m", "venv", "--without-pip", folder], cwd=folder.parent)
    assert done.returncode == 0, done.stderr
    python = folder / "bin" / "python"
    if beside_pins:
        site = Path(
            run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=folder).stdout.strip()
        )
        (site / "pinned_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--disable-pip-version-check"]
    if packages:
        done = run([*pip, *packages], cwd=folder)
        assert done.returncode == 0, done.stderr
    done = run([*pip, "--no-deps", wheel], cwd=folder)
    assert done.returncode == 0, done.stderr
    return folder / "bin"


def test_the_wheel_carries_its_data_and_no_stray_top_level_modules(wheel):
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "aim/graph_passes/data/tensorrt_onnx_support.json" in names
    assert "aim/serving/front.py" in names and "aim/serving/text_front.py" in names  # what Triton runs
    top = {name.split("/")[0] for name in names if not name.startswith("aim_modulation-")}
    assert top == {"aim"}


def test_installed_wheel_builds_an_engine_from_another_folder(wheel, tmp_path):
    bin_dir = venv(tmp_path / "venv", wheel, beside_pins=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run([bin_dir / "python", "-c", "import aim; print(aim.__file__)"], cwd=work)
    assert where.stdout.strip().startswith(str(tmp_path / "venv")), where  # the wheel's aim, not this tree's
    models = run([bin_dir / "aim", "models"], cwd=work)
    assert models.returncode == 0 and "image-classification" in models.stdout, models.stderr
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    import onnx

    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(work / "small.onnx"))
    check = run([bin_dir / "aim", "trt-check", "small.onnx"], cwd=work)
    assert check.returncode == 0 and "all supported" in check.stdout, check.stdout + check.stderr
    engine = run(
        [bin_dir / "aim", "engine", "resnet", "--out", "out", "--backend", "onnxruntime"], cwd=work, timeout=300
    )
    assert engine.returncode == 0 and "verification PASSED" in engine.stdout, (
        engine.stdout[-2000:] + engine.stderr[-2000:]
    )
    assert (work / "out" / "resnet" / "engine.onnxruntime.onnx").is_file()


def test_aim_run_needs_only_numpy_onnx_and_onnxruntime(wheel, tmp_path):
    from aim.pipeline.builder import build
    from aim.pipeline.model_source import FamilySource
    from aim.pipeline.request import BuildRequest

    manifest = build(
        FamilySource("resnet"), BuildRequest(tmp_path / "build", backend="onnxruntime"), log=lambda _: None
    ).manifest
    bin_dir = venv(tmp_path / "runtime", wheel, *(pin(name) for name in RUNTIME_PINS))
    for heavy in ("torch", "transformers", "onnx_graphsurgeon"):
        absent = run([bin_dir / "python", "-c", f"import {heavy}"], cwd=tmp_path)
        assert absent.returncode != 0 and f"No module named '{heavy}'" in absent.stderr
    images = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", images)
    done = run(
        [
            bin_dir / "aim",
            "run",
            manifest.engine_path(),
            "--input",
            f"pixel_values={tmp_path / 'x.npy'}",
            "--utility",
            "0.5",
            "--boost",
            "3=4",
            "-o",
            tmp_path / "out.npy",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert np.load(tmp_path / "out.npy").shape == (2, manifest.modulation.num_classes)
    refused = run(
        [
            bin_dir / "aim",
            "run",
            manifest.engine_path(),
            "--input",
            f"pixel_values={tmp_path / 'x.npy'}",
            "--utility",
            "-1",
        ],
        cwd=tmp_path,
    )
    assert refused.returncode == 2 and refused.stderr.startswith("error: utility")
