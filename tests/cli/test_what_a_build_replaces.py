"""What a build or a write may replace (aim/files.py states the rule once): a folder only if it holds
this project's build manifest (or is empty), a file only if it is a regular file, and never the source
the output is made from. Each refusal is one `error:` line, exit 2, before any work, nothing written."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from aim.cli import main
from aim.files import StagedFolder, WriteRefused, atomic_path, check_apart, check_file_replaceable, folder_hashes
from aim.layout import MANIFEST, Manifest
from tests.conftest import load, tiny_classifier


def cli(argv, capsys) -> tuple[int, str]:
    try:
        code = main([str(arg) for arg in argv])
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


def refused(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "error:" in line]) == 1, err
    for text in expected:
        assert text in err, err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny ResNet saved with save_pretrained, as a user's checkpoint folder."""
    folder = tmp_path_factory.mktemp("checkpoints") / "mymodel"
    load("resnet", seed=0)[2].save_pretrained(folder)
    return folder


def copy_of(checkpoint: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for path in checkpoint.iterdir():
        os.link(path, folder / path.name)
    return folder


def test_out_set_to_the_checkpoints_parent_is_refused(checkpoint, tmp_path, capsys):
    """`make engine CHECKPOINT=ckpt/mymodel OUT=ckpt` built into ckpt/mymodel: the checkpoint itself."""
    source = copy_of(checkpoint, tmp_path / "ckpt" / "mymodel")
    before = folder_hashes(source)
    code, err = cli(["engine", "--checkpoint", source, "--out", tmp_path / "ckpt"], capsys)
    refused(code, err, f"{tmp_path / 'ckpt' / 'mymodel'} is {source}", "Give an output folder outside it")
    assert folder_hashes(source) == before and sorted(os.listdir(tmp_path / "ckpt")) == ["mymodel"]


def test_out_set_to_the_checkpoint_by_another_spelling_is_refused(checkpoint, tmp_path, capsys, monkeypatch):
    """OUT=. from inside the checkpoint's parent, and the checkpoint reached through a symbolic link."""
    source = copy_of(checkpoint, tmp_path / "ckpt" / "mymodel")
    (tmp_path / "link").symlink_to(tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path / "ckpt")
    refused(*cli(["engine", "--checkpoint", "mymodel", "--out", "."], capsys), "which it is made from")
    refused(*cli(["engine", "--checkpoint", tmp_path / "link" / "mymodel", "--out", "."], capsys), "which it is")
    assert sorted(os.listdir(source)) == sorted(os.listdir(checkpoint))


def test_out_inside_the_checkpoint_is_refused(checkpoint, tmp_path, capsys):
    source = copy_of(checkpoint, tmp_path / "mymodel")
    code, err = cli(["engine", "--checkpoint", source, "--out", source / "build"], capsys)
    refused(code, err, "lies inside", "which it is made from")
    assert sorted(os.listdir(source)) == sorted(os.listdir(checkpoint))


@pytest.mark.parametrize("name", ["triton", "bench", "loadtest", "trained", "notes"])
def test_a_folder_of_the_users_in_out_is_never_replaced(checkpoint, tmp_path, capsys, name):
    """A checkpoint folder named like a folder already in OUT (a Triton repository, a user's notes):
    the build would replace OUT/<name>, which holds no build manifest."""
    source = copy_of(checkpoint, tmp_path / "checkpoints" / name)
    theirs = tmp_path / "build" / name
    (theirs / "resnet" / "1").mkdir(parents=True)
    (theirs / "notes.txt").write_text("my notes")
    (theirs / "resnet" / "config.pbtxt").write_text('name: "resnet"')
    before = snapshot(theirs)
    code, err = cli(["engine", "--checkpoint", source, "--out", tmp_path / "build"], capsys)
    refused(code, err, f"{theirs} exists and is not a folder this tool wrote", "never replaced")
    assert snapshot(theirs) == before
    assert sorted(os.listdir(tmp_path / "build")) == [name]  # no staging folder, no .failed


def test_another_programs_manifest_json_does_not_make_a_build_folder(tmp_path):
    """A web app's manifest.json is not a build manifest; an earlier build's (any schema, edited or
    not) is."""
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / MANIFEST).write_text(json.dumps({"name": "My app", "icons": []}))
    assert not Manifest.holds_build(tmp_path / "app")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / MANIFEST).write_text(
        json.dumps({"schema": 1, "model": "x", "artifacts": {}, "verification": {}})
    )
    assert Manifest.holds_build(tmp_path / "old")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / MANIFEST).write_bytes(b"\xff\x00")
    assert not Manifest.holds_build(tmp_path / "broken")


def test_a_users_onnx_is_never_inside_the_folder_its_build_replaces(tmp_path, capsys):
    """models/yours/yours.onnx built with --out models would replace models/yours/, the ONNX's own
    folder. Its folder is refused as OUT/<name> only: --out models/yours (the build in
    models/yours/yours/) is where users keep builds beside their model, and stays allowed."""
    onnx_file = tiny_classifier(
        (tmp_path / "models" / "yours").mkdir(parents=True) or tmp_path / "models/yours/yours.onnx"
    )
    before = snapshot(tmp_path / "models")
    argv = ["engine", "--onnx", onnx_file, "--logits", "scores", "--max-shapes", "x:4x6"]
    refused(*cli([*argv, "--out", tmp_path / "models"], capsys), "holds", "which it is made from")
    assert snapshot(tmp_path / "models") == before
    check_apart(tmp_path / "models" / "yours" / "yours", [onnx_file])  # --out models/yours: allowed


def test_a_device_or_a_pipe_is_never_replaced_by_an_output_file(tmp_path, capsys):
    """`aim export resnet -o /dev/full` as root replaced the device node with a regular file. Tested on
    a named pipe of our own (never on /dev/null of a shared machine), and the rule on /dev/null itself."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    code, err = cli(["export", "resnet", "-o", pipe], capsys)
    refused(code, err, "is a named pipe, not a regular file")
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode) and sorted(os.listdir(tmp_path)) == ["pipe"]
    for device in ("/dev/null", "/dev/full"):
        with pytest.raises(WriteRefused, match="character device"):
            check_file_replaceable(device)
    with pytest.raises(WriteRefused, match="named pipe"), atomic_path(pipe) as tmp:  # every writer's path
        tmp.write_text("x")
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode) and sorted(os.listdir(tmp_path)) == ["pipe"]
    (tmp_path / "target").write_text("theirs")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(WriteRefused, match="symbolic link"), atomic_path(tmp_path / "link") as tmp:
        tmp.write_text("x")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target").read_text() == "theirs"


def test_run_and_modulate_outputs_obey_the_same_rule(tmp_path, capsys):
    model = tiny_classifier(tmp_path / "m.onnx")
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    refused(*cli(["modulate", model, "-o", pipe, "--logits", "scores"], capsys), "is a named pipe")
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode)


def test_staged_folder_replaces_only_its_own(tmp_path):
    """StagedFolder: nothing, an empty folder and a folder `ours` recognises are replaced; a user's
    folder, a file and a symbolic link are not, checked on entry (before any work) and on publish."""

    def ours(folder: Path) -> bool:
        return (folder / "mine").is_file()

    for name, make in {
        "nothing": lambda p: None,
        "empty": lambda p: p.mkdir(),
        "ours": lambda p: (p.mkdir(), (p / "mine").write_text("")),
    }.items():
        make(tmp_path / name)
        with StagedFolder(tmp_path / name, ours) as staged:
            (staged.path / "new").write_text("new")
            staged.publish()
        assert os.listdir(tmp_path / name) == ["new"]

    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes").write_text("keep")
    with pytest.raises(WriteRefused, match="is not a folder this tool wrote"), StagedFolder(tmp_path / "theirs", ours):
        raise AssertionError("the work started")
    (tmp_path / "link").symlink_to(tmp_path / "ours")
    with pytest.raises(WriteRefused, match="symbolic link"), StagedFolder(tmp_path / "link", ours):
        raise AssertionError("the work started")
    (tmp_path / "file").write_text("keep")
    with pytest.raises(FileExistsError), StagedFolder(tmp_path / "file", ours):
        raise AssertionError("the work started")

    # Appearing while the work ran: refused at publish, the staging folder removed.
    with pytest.raises(WriteRefused), StagedFolder(tmp_path / "late", ours) as staged:
        (tmp_path / "late").mkdir()
        (tmp_path / "late" / "notes").write_text("keep")
        staged.publish()
    # A failed build's sibling: published and discarded only if it is ours.
    (tmp_path / "x.failed").mkdir()
    (tmp_path / "x.failed" / "mine").write_text("")
    with StagedFolder(tmp_path / "x", ours) as staged:
        with pytest.raises(WriteRefused):
            staged.publish(tmp_path / "theirs")
        staged.discard(tmp_path / "theirs")
        staged.discard(tmp_path / "x.failed")
    assert (tmp_path / "theirs" / "notes").read_text() == "keep" and not (tmp_path / "x.failed").exists()
    assert sorted(os.listdir(tmp_path)) == ["empty", "file", "late", "link", "nothing", "ours", "theirs"]
    assert (tmp_path / "late" / "notes").read_text() == "keep"
