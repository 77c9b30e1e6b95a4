"""Generation stays inside what the build takes: the prompt and the new tokens against the engine's
range and the model's positions, refused before anything runs or cut with truncate=True."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from aim.errors import InvalidInputError
from aim.generation import generate, generate_text, load_build
from aim.layout import Manifest
from aim.runtime.onnxruntime import OnnxRuntimeEngine
from tests.conftest import link_or_copy

POSITIONS = 16  # a model made for 16 positions (the tiny Llama has 2048, more than the engine's 1024)


@pytest.fixture(scope="module")
def short_model(build_folder, tmp_path_factory):
    """The tiny Llama build, its manifest saying the model has 16 positions (through the Manifest API,
    which seals it again), and the token count of a prompt by the build's own tokenizer."""
    folder = tmp_path_factory.mktemp("short") / "llama"
    shutil.copytree(build_folder("llama"), folder, copy_function=link_or_copy)
    (folder / "manifest.json").unlink()  # a hard link to the shared build's: write a new file
    manifest = Manifest.load(build_folder("llama"))
    manifest.max_positions = POSITIONS
    manifest.save(folder)
    _, tokenizer, _ = load_build(folder)
    return folder, len(tokenizer.encode("def main():"))


@pytest.fixture
def fed(monkeypatch):
    """Every feed the ONNX Runtime engines run, in order."""
    feeds = []
    original = OnnxRuntimeEngine._infer

    def recording(self, feed):
        feeds.append(
            {
                name: np.array(value)
                for name, value in feed.items()
                if name in ("input_ids", "attention_mask", "position_ids")
            }
        )
        return original(self, feed)

    monkeypatch.setattr(OnnxRuntimeEngine, "_infer", recording)
    return feeds


def test_the_last_position_is_the_models_last(short_model, fed):
    """S prompt tokens and POSITIONS - S + 1 new ones: the last step attends to exactly POSITIONS
    tokens and sits at position POSITIONS - 1 (counted here from the feeds, not from the check)."""
    folder, prompt = short_model
    new = POSITIONS - prompt + 1
    texts, run = generate_text(folder, ["def main():"], max_new_tokens=new)
    assert run.tokens.shape[1] == new == len(fed)  # no stop token in the random model's greedy path
    assert fed[-1]["attention_mask"].shape[1] == POSITIONS and fed[-1]["position_ids"].max() == POSITIONS - 1
    fed.clear()
    with pytest.raises(
        InvalidInputError,
        match=rf"{prompt + new} positions, more than the {POSITIONS} .*the model's {POSITIONS} positions.*at "
        rf"most {new} new tokens",
    ):
        generate_text(folder, ["def main():"], max_new_tokens=new + 1)
    assert fed == []  # refused before the engine ran


def test_a_long_prompt_is_refused_or_cut_to_its_last_tokens(short_model, fed):
    folder, _ = short_model
    long_prompt = "x = 1\n" * 20
    with pytest.raises(InvalidInputError, match=rf"the prompt has \d+ tokens, more than the {POSITIONS}"):
        generate_text(folder, [long_prompt], max_new_tokens=4)
    assert fed == []
    notes = []
    generate_text(folder, [long_prompt, "hi"], max_new_tokens=4, truncate=True, log=notes.append)
    keep = POSITIONS - 4 + 1
    assert any(f"cut to their last {keep} tokens" in note for note in notes), notes
    assert fed[0]["input_ids"].shape == (2, keep) and fed[-1]["attention_mask"].shape[1] == POSITIONS
    assert fed[0]["attention_mask"][1].sum() < keep  # the short prompt kept all its tokens, left-padded


def test_empty_rows_are_refused_before_the_engine_runs(short_model, fed):
    folder, _ = short_model
    engine, _, _ = load_build(folder)
    ids = np.array([[5, 6, 7], [0, 0, 0]])
    mask = np.array([[1, 1, 1], [0, 0, 0]])  # a fully masked row would generate from nothing
    with pytest.raises(InvalidInputError, match="prompt 2 has none"):
        generate(engine, ids, mask, max_new_tokens=2)
    assert fed == []
