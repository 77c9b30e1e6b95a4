"""Generation with learned absolute positions: a GPT-2 checkpoint folder (tiny config, saved with
save_pretrained, as a user would) built and asked through the CLI, against transformers' own
generate() on the same folder. Llama's rotary positions only see differences of positions, so a decode
loop whose position ids are off by one still generates Llama's tokens; GPT-2 adds a learned vector per
position, and then generates other ones. A left-padded batch checks the positions of padded rows too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aim.cli import main

PROMPTS = ["def main():", "for item in items: print("]  # different lengths: the first is left-padded
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny GPT-2 with a tokenizer of its vocabulary, saved as a checkpoint folder, and its build."""
    import transformers

    from aim.export.tokenizer import demo_tokenizer

    root = tmp_path_factory.mktemp("gpt2")
    tokenizer = demo_tokenizer(512)
    config = transformers.GPT2Config(
        vocab_size=512,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    with torch.no_grad():
        model = transformers.GPT2LMHeadModel(config).eval()
        model.transformer.wpe.weight.mul_(10)  # positions weigh as much as tokens do in a trained GPT-2
    model.save_pretrained(root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")
    assert main(["engine", "--checkpoint", str(root / "gpt2"), "--out", str(root / "build")]) == 0
    return root / "gpt2", root / "build" / "gpt2"


def transformers_texts(checkpoint) -> list[str]:
    """transformers alone: its tokenizer (left padding), its generate() (greedy), its decode."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, local_files_only=True).eval()
    # GPT-2 adds wte[token_type_ids] when they are given; the tokenizer's are all 0, which the model never saw.
    encoded = tokenizer(PROMPTS, padding=True, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        out = model.generate(
            **encoded,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    texts = []
    for row in out[:, encoded["input_ids"].shape[1] :].numpy():
        stop = np.flatnonzero(row == tokenizer.eos_token_id)
        texts.append(tokenizer.decode(row[: stop[0] if stop.size else len(row)], skip_special_tokens=True))
    assert encoded["attention_mask"][0, 0] == 0  # the batch is padded
    return texts


def test_gpt2_generates_what_transformers_generates(gpt2, capsys):
    checkpoint, build = gpt2
    capsys.readouterr()
    argv = ["generate", str(build), "--max-new-tokens", str(NEW_TOKENS), "--quiet"]
    assert main([*argv, *(arg for prompt in PROMPTS for arg in ("--prompt", prompt))]) == 0
    texts = transformers_texts(checkpoint)
    assert capsys.readouterr().out == "".join(f"{prompt}{text}\n" for prompt, text in zip(PROMPTS, texts))
    assert all(texts) and texts[0] != texts[1]  # something was generated, and the rows differ
    for prompt, text in zip(PROMPTS, texts):  # alone: unpadded
        assert main([*argv, "--prompt", prompt]) == 0
        assert capsys.readouterr().out == f"{prompt}{text}\n"
