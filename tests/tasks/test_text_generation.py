"""Modulated text generation: the KV-cache engine against PyTorch, the knobs per token, the CLI."""

import numpy as np
import pytest
import torch
from scipy import stats

from aim.cli import main as cli_main
from aim.errors import AimError, InvalidInputError
from aim.evaluation.theory import win_probability
from aim.families import get_family
from aim.generation import generate, generate_text, load_build, per_step, token_focus
from aim.generation.focus import parse_focus, word_tokens
from aim.generation.loop import kv_vs_recompute, last_logits
from aim.generation.reference_runs import generation_runs
from aim.generation.sampling import sample
from aim.layout import REFERENCE, TOKENIZER_DIR
from aim.pipeline import builder
from aim.pipeline.engine_runs import run_statistical_checks
from aim.pipeline.model_source import FamilySource
from aim.pipeline.request import BuildRequest
from aim.tasks import get_task
from aim.tasks.decoder_inputs import pad_left
from aim.verify.reference import Reference
from aim.verify.statistics import KS_ALPHA
from tests.conftest import load

CONFIG = get_family("llama")
TASK = get_task(CONFIG.task)
NEW_TOKENS = 16
# Prompts of different lengths, as token ids (3 left-padded rows when batched).
PROMPTS = [[5, 900, 17, 4242, 31000, 77, 12], [18, 2], [400, 401, 402, 403]]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """The llama family built by the pipeline (tiny random weights, seed 0), and the same PyTorch model."""
    out = tmp_path_factory.mktemp("build")
    builder.build(FamilySource("llama"), BuildRequest(out), log=lambda _: None)
    engine, tokenizer, manifest = load_build(out / "llama")
    return out / "llama", engine, tokenizer, manifest, load("llama", seed=0)[2]


def torch_greedy(model, ids, mask, new_tokens, stop=(), pad=0):
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=list(stop) or None,
            top_k=None,
            top_p=None,
            temperature=None,
        )
    return out[:, ids.shape[1] :].numpy()


@pytest.mark.parametrize("rows", [[0], [0, 1, 2]], ids=["batch1", "padded_batch3"])
def test_greedy_tokens_equal_pytorch_generate(build, rows):
    _, engine, _, _, model = build
    ids, mask = pad_left([PROMPTS[r] for r in rows], pad_token_id=0)
    expected = torch_greedy(model, ids, mask, NEW_TOKENS)
    run = generate(engine, ids, mask, max_new_tokens=NEW_TOKENS, utility=0.0)
    assert run.tokens.shape == (len(rows), NEW_TOKENS)
    np.testing.assert_array_equal(run.tokens, expected)
    assert len({tuple(r) for r in run.tokens}) == len(rows)  # the rows really are different sequences


def test_stop_tokens_end_a_sequence_as_generate_does(build):
    """The second token a row greedily generates is made a stop token: that row pads afterwards, others go on."""
    _, engine, _, _, model = build
    ids, mask = pad_left(PROMPTS, pad_token_id=0)
    free = generate(engine, ids, mask, max_new_tokens=6).tokens
    stop = int(free[1, 1])
    run = generate(engine, ids, mask, max_new_tokens=6, stop_tokens=[stop], pad_token_id=0)
    np.testing.assert_array_equal(run.tokens, torch_greedy(model, ids, mask, 6, stop=[stop], pad=0))
    assert run.finished[1] and run.tokens[1, 1] == stop and np.all(run.tokens[1, 2:] == 0)


def test_kv_cache_matches_full_recompute(build):
    """Through the cache vs recomputing every step from scratch: both on the engine, and vs PyTorch.
    Tolerance: the family's fp32 atol 1e-4 (measured ~2e-7)."""
    _, engine, _, _, model = build
    ids, mask = pad_left(PROMPTS, pad_token_id=0)
    assert kv_vs_recompute(engine, ids, mask, steps=8) <= CONFIG.tolerance.atol
    run = generate(engine, ids, mask, max_new_tokens=8, keep_logits=True)
    full_ids = np.concatenate([ids, run.tokens[:, :-1]], axis=1)
    full_mask = np.concatenate([mask, np.ones((3, 7), np.int64)], axis=1)
    with torch.no_grad():
        reference = (
            model(
                input_ids=torch.from_numpy(full_ids),
                attention_mask=torch.from_numpy(full_mask),
                position_ids=torch.from_numpy(
                    np.clip(np.cumsum(full_mask, 1) - 1, 0, None) * full_mask + (1 - full_mask)
                ),
            )
            .logits[:, -1]
            .numpy()
        )
    np.testing.assert_allclose(run.logits[-1], reference, atol=CONFIG.tolerance.atol, rtol=CONFIG.tolerance.rtol)
    np.testing.assert_allclose(last_logits(engine, full_ids, full_mask), reference, atol=CONFIG.tolerance.atol)


class Recorder:
    """An engine that records the feeds of a generation (the decode states), passing them through."""

    def __init__(self, engine):
        self.engine, self.feeds = engine, []
        self.inputs = engine.inputs

    def infer(self, feed):
        self.feeds.append(dict(feed))
        return self.engine.infer(feed)


def decode_state(engine, step=4):
    """The inputs of a real decode step (one new token after a cache of prompt + `step` tokens), knobs removed."""
    recorder = Recorder(engine)
    ids, mask = pad_left(PROMPTS, pad_token_id=0)
    generate(recorder, ids, mask, max_new_tokens=step + 1)
    feed = recorder.feeds[step]
    assert feed["input_ids"].shape == (3, 1) and feed["past_key_values.0.key"].shape[2] == ids.shape[1] + step - 1
    return {k: v for k, v in feed.items() if k not in ("utility", "focus")}


def test_per_token_noise_statistics_follow_spec(build):
    """docs/method.md §5 on a real decode step through the cache, with verify/statistics.py's checks."""
    _, engine, _, _, _ = build
    inputs = decode_state(engine)
    engine.set_seed(0)
    bare = engine.run(inputs, 0.0, None)
    checks = run_statistical_checks(engine, inputs, bare, class_axis=1, seed=0)
    assert len(checks) == 8
    for check in checks:
        assert check.passed, check


def test_greedy_agreement_per_token_follows_theory(build):
    """At utility sigma, the engine's greedy token equals the clean one with probability P_top1(sigma)."""
    _, engine, _, _, _ = build
    state = decode_state(engine)
    inputs = {k: np.concatenate([v] * 2) for k, v in state.items()}  # batch 6
    engine.set_seed(1)
    clean = engine.run(inputs, 0.0, None)
    sigma, runs = 0.05, 270
    hits = np.mean([np.argmax(engine.run(inputs, sigma, None), 1) == np.argmax(clean, 1) for _ in range(runs)], axis=0)
    theory = win_probability(clean, clean.argmax(1), sigma)  # docs/method.md §3, evaluation/theory.py
    assert 0.05 < theory.mean() < 0.95  # a sigma where the test can tell theory from 0 or 1
    stderr = np.sqrt(np.sum(theory * (1 - theory)) / runs) / len(theory)
    # Two-sided at the checks' ALPHA (5.3 standard errors): a correct engine fails once in 1e7 seeds.
    assert abs(hits.mean() - theory.mean()) < stats.norm.isf(KS_ALPHA / 2) * stderr, (hits, theory)


def test_boosted_token_appears_more_often(build):
    _, engine, tokenizer, _, _ = build
    ids, mask = pad_left(PROMPTS, pad_token_id=0)
    plain = generate(engine, ids, mask, max_new_tokens=NEW_TOKENS).tokens
    target = next(t for t in range(1000, 32000) if t not in plain)
    focus = token_focus(tokenizer, 32000, boost={target: 2.0})
    engine.set_seed(2)
    boosted = generate(engine, ids, mask, max_new_tokens=NEW_TOKENS, focus=focus).tokens
    # Boost 2 lifts a median token past the top (~0.65 logit units above it) when |n| > ~0.33: ~3/4 of
    # the 48 steps. Were they independent, > 0.4 (20 or more) would fail with probability ~1e-8.
    assert np.mean(boosted == target) > 0.4 and np.mean(plain == target) == 0


def test_suppressed_token_never_wins(build):
    _, engine, tokenizer, _, _ = build
    ids, mask = pad_left(PROMPTS, pad_token_id=0)
    plain = generate(engine, ids, mask, max_new_tokens=NEW_TOKENS).tokens
    favourite = int(plain[0, 0])  # row 0's greedy first token
    focus = np.zeros((3, 32000), np.float32)
    focus[:, favourite] = -1e4  # strong suppression for every row
    for seed in range(3):
        engine.set_seed(seed)
        run = generate(engine, ids, mask, max_new_tokens=NEW_TOKENS, utility=0.02, focus=focus)
        assert favourite not in run.tokens
    assert favourite in plain


def test_knobs_change_per_step_and_per_sequence(build):
    """A callable utility: clean for the first 3 steps, then noisy for row 1 only."""
    _, engine, _, _, _ = build
    ids, mask = pad_left(PROMPTS, pad_token_id=0)
    plain = generate(engine, ids, mask, max_new_tokens=10).tokens
    seen = []

    def utility(step, tokens):
        seen.append(tokens.shape)
        return np.array([0.0, 5.0 if step >= 3 else 0.0, 0.0], np.float32)

    engine.set_seed(3)
    run = generate(engine, ids, mask, max_new_tokens=10, utility=utility)
    assert seen[0] == (3, 0) and seen[4] == (3, 4)
    np.testing.assert_array_equal(run.tokens[[0, 2]], plain[[0, 2]])
    np.testing.assert_array_equal(run.tokens[1, :3], plain[1, :3])
    assert np.mean(run.tokens[1, 3:] != plain[1, 3:]) > 0.5  # sigma 5 >> logit spread 0.16: scrambled
    # The same schedule as per-step arrays; focus too: suppress row 2's clean step-5 token from step 5 on.
    suppress = np.zeros((3, 32000), np.float32)
    suppress[2, plain[2, 5]] = -1e4
    steps = [np.array([0.0, 5.0 if step >= 3 else 0.0, 0.0], np.float32) for step in range(4)]
    again = generate(
        engine, ids, mask, max_new_tokens=10, utility=per_step(steps), focus=per_step([None] * 5 + [suppress])
    )
    np.testing.assert_array_equal(again.tokens[0], plain[0])
    np.testing.assert_array_equal(again.tokens[2, :5], plain[2, :5])
    assert again.tokens[2, 5] != plain[2, 5] and np.array_equal(again.tokens[1, :3], plain[1, :3])


def test_sampling_is_seeded_and_top_k_restricts(build):
    _, engine, _, _, _ = build
    ids, mask = pad_left(PROMPTS, pad_token_id=0)
    first = generate(engine, ids, mask, max_new_tokens=8, temperature=1.0, top_k=4, seed=11).tokens
    again = generate(engine, ids, mask, max_new_tokens=8, temperature=1.0, top_k=4, seed=11).tokens
    other = generate(engine, ids, mask, max_new_tokens=8, temperature=1.0, top_k=4, seed=12).tokens
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    logits = np.random.default_rng(0).normal(size=(2000, 50))
    drawn = sample(logits, 1.0, 3, np.random.default_rng(1))
    top3 = np.argsort(-logits, axis=1)[:, :3]
    assert all(d in row for d, row in zip(drawn, top3))
    assert np.array_equal(sample(logits, 0.0, 3, None), np.argmax(logits, 1))
    # Temperature-1 sampling from two logits with gap log 3 picks the larger 3/4 of the time.
    pair = np.tile([[np.log(3.0), 0.0]], (20000, 1))
    share = np.mean(sample(pair, 1.0, 0, np.random.default_rng(2)) == 0)
    assert stats.binomtest(int(share * 20000), 20000, 0.75).pvalue > KS_ALPHA


def test_focus_on_words_and_ids(build):
    _, _, tokenizer, _, _ = build
    boost, suppress = parse_focus("+fox=5, -import=10,+#123=4")
    assert boost == {"fox": 5.0, 123: 4.0} and suppress == {"import": 10.0}
    focus = token_focus(tokenizer, 32000, boost, suppress)
    fox, imp = word_tokens(tokenizer, "fox"), word_tokens(tokenizer, "import")
    # "import" and " import" are two tokens; "fox" is one, " fox" splits (" f", "o", "x") and is left out
    assert [tokenizer.decode([t]) for t in imp] == [" import", "import"] and [tokenizer.decode([t]) for t in fox] == [
        "fox"
    ]
    assert all(focus[t] == -10.0 for t in imp) and focus[fox[0]] == 5.0 and focus[123] == 4.0
    assert np.count_nonzero(focus) == len(fox) + len(imp) + 1
    for bad in ("fox=5", "+fox", "+fox=lots", "+#-1=5", "+#x=5"):
        with pytest.raises(InvalidInputError, match="focus"):
            parse_focus(bad)
    with pytest.raises(InvalidInputError, match="not one token.*'z'"):  # never its first piece
        token_focus(tokenizer, 32000, boost={"zqxjkvwy": 5.0})
    with pytest.raises(InvalidInputError, match="out of range"):
        token_focus(tokenizer, 32000, boost={40000: 1.0})


def test_bad_generation_input(build, tmp_path):
    folder, engine, _, _, _ = build
    with pytest.raises(InvalidInputError, match="temperature"):
        generate(engine, [[1, 2]], temperature=-1.0)
    with pytest.raises(InvalidInputError, match="at least one token"):
        generate(engine, [[1, 2], []])
    with pytest.raises(InvalidInputError, match="utility"):
        generate(engine, [[1, 2]], utility=-1.0)
    with pytest.raises(AimError, match="no build there"):
        load_build(tmp_path)


def test_cli_streams_text(build, capsys):
    folder, _, tokenizer, _, _ = build
    assert cli_main(["generate", str(folder), "--prompt", "def main():", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    texts, run = generate_text(folder, ["def main():"], max_new_tokens=6)
    assert out == "def main():" + texts[0] + "\n"
    assert "6 tokens" in err and "tokens/s" in err
    assert cli_main(["generate", str(folder), "--prompt", "a", "--focus", "oops"]) == 2
    assert "focus items" in capsys.readouterr().err


def test_local_checkpoint_with_its_own_tokenizer(tmp_path):
    """A tiny Llama and a tokenizer of its own, saved with save_pretrained here, go through export,
    engine and generation; the build uses the checkpoint's tokenizer, not the local default."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["the cat sat on the mat", "a dog and a cat", "once upon a time there was a fox"]
    words.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(5)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            max_position_embeddings=256,
        )
    ).eval()
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")

    manifest = builder.build(
        FamilySource("llama", tmp_path / "ckpt"), BuildRequest(tmp_path / "build"), log=lambda _: None
    ).manifest
    checks = {c.name: c for c in manifest.verification.checks}
    assert manifest.verification.passed and checks["greedy tokens at utility 0 = PyTorch generate()"].passed
    folder = tmp_path / "build" / "llama"
    engine, built_tokenizer, _ = load_build(folder)
    assert len(built_tokenizer) == len(tokenizer) < 64 and built_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert len([n for n in engine.inputs if n.startswith("past_key_values.")]) == 6  # 3 layers
    prompts = ["the cat sat", "once upon a time there was"]
    texts, run = generate_text(folder, prompts, max_new_tokens=8)
    ids, mask = built_tokenizer.batch(prompts)  # read without transformers: the same ids as transformers'
    tokenizer.padding_side, tokenizer.pad_token = "left", tokenizer.eos_token  # as the build sets them
    encoded = tokenizer(prompts, padding=True, return_tensors="np")
    np.testing.assert_array_equal(ids, encoded["input_ids"])
    np.testing.assert_array_equal(mask, encoded["attention_mask"])
    assert mask.min() == 0  # prompts of different lengths: a padded batch
    expected = torch_greedy(model, ids, mask, 8, stop=[2], pad=2)
    np.testing.assert_array_equal(run.tokens, expected)
    assert all(isinstance(t, str) for t in texts) and (folder / TOKENIZER_DIR / "tokenizer.json").is_file()


def test_local_tokenizer_is_deterministic_and_fits_the_model():
    from aim.export.tokenizer import demo_tokenizer

    first, again = demo_tokenizer(32000), demo_tokenizer(32000)
    assert len(first) == 32000 and first.get_vocab() == again.get_vocab()
    assert [first.unk_token_id, first.bos_token_id, first.eos_token_id] == [0, 1, 2]  # Llama's ids
    text = "def main():\n    return 'naïve ✓'"
    assert first.decode(first.encode(text, add_special_tokens=False)) == text  # byte-level: any text round-trips
    with pytest.raises(AimError, match="too few for a byte-level tokenizer"):
        demo_tokenizer(100)


def test_reduced_precision_generation_checks_use_teacher_forcing(build):
    """FP16 builds are held to the family's Agreement along PyTorch's tokens; wrong tokens fail it."""
    import dataclasses

    folder, engine, _, _, _ = build
    reference = Reference.load(folder / REFERENCE).extra
    forced = reference["generation.1.tokens"][:, ::-1].copy()  # some other continuation
    run = generate(
        engine,
        reference["generation.1.input_ids"],
        reference["generation.1.attention_mask"],
        forced=forced,
        max_new_tokens=99,
    )
    np.testing.assert_array_equal(run.tokens, forced)
    spec = CONFIG.fp16
    assert spec is not None and spec.metric == "top_k"
    runs = generation_runs(engine, reference, reduced=True)
    assert all(check.passed for check in TASK.checks(runs, reference, CONFIG.tolerance, spec))
    wrong = dict(reference)
    for index in range(3):
        wrong[f"generation.{index}.tokens"] = (reference[f"generation.{index}.tokens"] + 1000) % 32000
    runs = generation_runs(engine, wrong, reduced=True)
    greedy, _ = TASK.checks(runs, wrong, CONFIG.tolerance, dataclasses.replace(spec, min_fraction=0.5))
    assert not greedy.passed and greedy.metrics["fraction"] < 0.1


def test_tensorrt_rtx_fp16_build_with_kv_cache_and_generation_from_it(tmp_path):
    """TensorRT for RTX builds the KV-cache graph with the config's profile (an empty cache at prefill
    included); the FP16 build passes the reduced-precision generation checks; generating from the
    build runs the engine where it can run, else ONNX Runtime on the graph it was built from, saying so."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed: pip install -e '.[rtx]'")
    from aim.runtime import tensorrt as trt_engine

    manifest = builder.build(
        FamilySource("llama"), BuildRequest(tmp_path, backend="tensorrt-rtx", precision="fp16"), log=lambda _: None
    ).manifest
    assert manifest.verification.passed and manifest.engine.endswith(".plan")
    past = manifest.profile["past_key_values.0.key"]
    assert past["min"][2] == 0 and past["max"][2] == CONFIG.dims["past_sequence"].max
    names = [c.name for c in manifest.verification.checks]
    assert (
        any("teacher forcing" in name for name in names) and "KV cache vs full recompute (reduced precision)" in names
    )
    notes = []
    texts, run = generate_text(tmp_path / "llama", ["def main():"], max_new_tokens=5, log=notes.append)
    assert run.tokens.shape == (1, 5)
    runnable, why = trt_engine.engine_runnable("tensorrt-rtx")
    assert bool(notes) == (not runnable) and (runnable or "running modulated.fp16.onnx on ONNX Runtime" in notes[0])
