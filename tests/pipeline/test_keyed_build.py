"""`make engine NOISE=keyed` end to end, per family: the keyed checks pass, the manifest names the key
by its fingerprint only, the key file rebuilds an engine that answers as before, and bad input
writes nothing."""

import os
import shutil
import stat

import numpy as np
import pytest

from aim.cli import main
from aim.errors import VerificationError
from aim.families import list_families
from aim.graph_passes.noise_key import NoiseKey
from aim.layout import REFERENCE, Manifest
from aim.pipeline.builder import build
from aim.pipeline.model_source import FamilySource
from aim.pipeline.request import BuildRequest
from aim.pipeline.verify import verify_folder
from aim.runtime.folder import Build
from aim.verdicts import Check
from aim.verify.reference import Reference

KEYED_CHECKS = {
    "keyed production vs PyTorch twin (element-wise)",
    "same request, same answer (two runs)",
    "same request alone and in a batch (same draw)",
    "utility noise ~ N(0,1), distinct requests",
    "no correlation between rows or neighbouring elements",
}


@pytest.mark.parametrize("model", list_families())
def test_keyed_build_verifies_and_records_only_the_fingerprint(keyed_build, model):
    manifest = keyed_build(model)
    checks = {c.name: c for c in manifest.verification.checks}
    assert KEYED_CHECKS <= set(checks) and "fresh draws" not in checks
    assert all(c.passed for c in checks.values()), [c for c in checks.values() if not c.passed]
    key = NoiseKey.read(keyed_build.key_file)
    assert stat.S_IMODE(os.stat(keyed_build.key_file).st_mode) == 0o600
    assert manifest.modulation.noise == "keyed" and manifest.modulation.key_fingerprint == key.fingerprint
    for path in manifest.folder.rglob("*"):  # the key itself is nowhere in the build folder
        assert not path.is_file() or key.secret.hex().encode() not in path.read_bytes()
    assert Reference.load(manifest.folder / REFERENCE).keyed_modulated is not None
    assert verify_folder(manifest.folder).verification.passed  # `aim verify` re-runs the keyed checks


def test_the_key_file_rebuilds_an_engine_that_answers_as_before(keyed_build, tmp_path, capsys):
    first = keyed_build("resnet")
    assert (
        main(["engine", "resnet", "--out", str(tmp_path), "--noise", "keyed", "--noise-key", str(keyed_build.key_file)])
        == 0
    )
    assert f"key fingerprint {first.modulation.key_fingerprint}" in capsys.readouterr().out
    inputs = Reference.load(first.folder / REFERENCE).inputs

    def answer(folder):
        with Build.open(folder).runner("production") as engine:
            return engine.run(inputs, [1.0, 3.0], None)

    assert np.array_equal(answer(first.folder), answer(tmp_path / "resnet"))


def test_a_failed_keyed_build_writes_no_key_file(tmp_path, monkeypatch):
    monkeypatch.setattr(
        "aim.pipeline.builder.judge_build", lambda *args: [Check("a check that fails", False, "on purpose")]
    )
    with pytest.raises(VerificationError, match="a check that fails"):
        build(
            FamilySource("resnet"),
            BuildRequest(tmp_path / "build", noise="keyed", key=tmp_path / "noise.key"),
            log=lambda _: None,
        )
    assert not (tmp_path / "noise.key").exists()


def test_bad_noise_arguments_exit_2_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "build"
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("0123")
    cases = [
        (["--noise-key", str(tmp_path / "k")], "is for keyed noise"),
        (["--noise", "keyed", "--noise-key", str(bad_key)], "is not a noise key"),
    ]
    for extra, message in cases:
        assert main(["engine", "resnet", "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "k").exists()


@pytest.mark.parametrize("model", list_families())
def test_tensorrt_rtx_builds_the_keyed_engine_of_every_family(model, tmp_path):
    """`make engine MODEL=x NOISE=keyed BACKEND=tensorrt-rtx`: real plans from the keyed graphs (Llama's
    with its KV cache), verified by the keyed checks on ONNX Runtime where no GPU runs them."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed: pip install -e '.[rtx]'")
    manifest = build(
        FamilySource(model), BuildRequest(tmp_path, backend="tensorrt-rtx", noise="keyed"), log=lambda _: None
    ).manifest
    assert manifest.engine.endswith(".plan") and (manifest.folder / manifest.engine).stat().st_size > 0
    assert manifest.tensorrt["engine"]["backend"] == "tensorrt-rtx"
    assert manifest.modulation.noise == "keyed" and manifest.verification.passed
    assert KEYED_CHECKS <= {check.name for check in manifest.verification.checks}


def test_reuse_keeps_a_build_made_as_asked_and_rebuilds_one_made_otherwise(build_folder, tmp_path, capsys):
    """`aim engine --reuse` (what `make triton/generate/loadtest` run first): a fresh-noise build is not
    what NOISE=keyed asks for, so it is rebuilt keyed; asked again, the keyed build is kept; a key file
    that is another key's, another precision or another seed ask for a build again."""
    out = tmp_path / "out"
    shutil.copytree(build_folder("resnet"), out / "resnet")
    fresh = Manifest.load(out / "resnet")
    assert main(["engine", "resnet", "--out", str(out), "--reuse"]) == 0  # asked as built: kept
    assert "reused" in capsys.readouterr().err and Manifest.load(out / "resnet").created == fresh.created
    key_file = tmp_path / "owner.key"
    keyed = ["engine", "resnet", "--out", str(out), "--noise", "keyed", "--noise-key", str(key_file), "--reuse"]
    assert main(keyed) == 0
    built = Manifest.load(out / "resnet")
    assert "reused" not in capsys.readouterr().err and built.modulation.noise == "keyed"
    assert built.modulation.key_fingerprint == NoiseKey.read(key_file).fingerprint
    assert (
        main(keyed) == 0
        and "reused" in capsys.readouterr().err
        and Manifest.load(out / "resnet").created == built.created
    )
    shutil.copytree(out / "resnet", tmp_path / "keyed")
    NoiseKey.draw().write(tmp_path / "other.key")
    asked = ["engine", "resnet", "--out", str(out), "--noise", "keyed", "--reuse"]
    for changed in (
        ["--noise-key", str(tmp_path / "other.key")],
        ["--noise-key", str(key_file), "--precision", "fp16"],
        ["--seed", "1"],
    ):
        shutil.rmtree(out / "resnet")
        shutil.copytree(tmp_path / "keyed", out / "resnet")  # the keyed build, each time
        assert main(asked + changed) == 0
        assert "reused" not in capsys.readouterr().err, changed


def test_make_triton_with_noise_keyed_serves_a_keyed_build_not_the_earlier_fresh_one(build_folder, tmp_path):
    from tests.test_makefile import make

    out = tmp_path / "out"
    shutil.copytree(build_folder("resnet"), out / "resnet")
    result = make("triton", MODEL="resnet", OUT=str(out), NOISE="keyed", REPO=str(tmp_path / "repo"))
    assert result.returncode == 0, result.stderr
    assert Manifest.load(out / "resnet").modulation.noise == "keyed"
    assert "reused" not in result.stderr
    again = make("triton", MODEL="resnet", OUT=str(out), NOISE="keyed", REPO=str(tmp_path / "repo2"))
    assert again.returncode == 0 and "reused" in again.stderr, again.stderr
