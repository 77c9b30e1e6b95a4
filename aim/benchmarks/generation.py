"""Generation against its peers: tokens/s of aim's decode loop on a build's ONNX Runtime engine, at
utility 0 and 3, beside the bare graph through the same loop, Optimum's `ORTModelForCausalLM` and
transformers' eager `generate()`: one checkpoint, the same prompts and the same number of new tokens,
interleaved round by round (one prompt per round, rotating; every variant gets the round's prompt).

The checkpoint has SmolLM-135M's shape (Llama architecture: hidden 576, 30 layers, 9/3 heads, MLP
1536, vocabulary 49,152, tied embeddings), random weights, saved in fp32 by `save_pretrained` with a
byte-level BPE tokenizer trained here (aim/export/tokenizer.py), and cached in OUT/bench/generation/
with its build (`aim engine --checkpoint`, reused while made as asked) and Optimum's export of it
(`optimum-cli export onnx`, offline). Every ONNX Runtime session (aim's and Optimum's) gets the same
options: 2 intra-op threads, no spinning, all graph optimisations. Greedy decoding, no stop token:
every variant makes exactly the same number of tokens (checked before timing).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from aim.benchmarks import figures as names
from aim.benchmarks.confidence import BUDGET, Budget, Figure, ratio, resolve
from aim.benchmarks.timing import THREADS, Rounds, quiet_engine

BATCH = 8  # prompts at once in the batched group
PROMPTS = (
    "def main():",
    "The quick brown fox",
    "import numpy as np\n",
    "Once upon a time, there was",
    "class Tokenizer:\n    def __init__(self",
    "for i in range(10):",
    "The weather today is",
    "# Read the file and count the words\n",
)
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def shape(quick: bool) -> dict:
    """The checkpoint's config: SmolLM-135M's shape, or a tiny one for --quick."""
    if quick:
        return dict(
            vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256,
        )  # fmt: skip
    return dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=10000.0,
    )  # fmt: skip


def make_checkpoint(folder: Path, quick: bool, seed: int = 0) -> Path:
    """A Llama checkpoint of `shape(quick)` with random weights and a tokenizer beside it (kept: a
    later run reuses it)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aim.export.tokenizer import demo_tokenizer
    from aim.files import StagedFolder

    config = LlamaConfig(**shape(quick), bos_token_id=1, eos_token_id=2, pad_token_id=2)  # the demo tokenizer's ids
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with StagedFolder(folder) as staged:
        model.save_pretrained(staged.path)
        demo_tokenizer(config.vocab_size).save_pretrained(staged.path)
        staged.publish()
    return folder


def _child(command: list[str], what: str, log) -> None:
    """Runs `command` offline in a child process (its memory goes with it), its output passed to `log`."""
    log(f"  generation: {what}")
    env = {**os.environ, **OFFLINE}
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as child:
        for line in child.stdout:
            log("    " + line.rstrip())
    if child.returncode != 0:
        raise SystemExit(f"bench: {what} failed (exit code {child.returncode})")


def build(checkpoint: Path, out: Path, log) -> Path:
    """The checkpoint's verified ONNX Runtime build, as `make engine CHECKPOINT=... BACKEND=onnxruntime`
    makes it (reused while made as asked)."""
    from aim.families.from_checkpoint import build_name

    command = [sys.executable, "-m", "aim.cli", "engine", "--checkpoint", str(checkpoint), "--out", str(out)]
    _child([*command, "--backend", "onnxruntime", "--reuse"], f"aim engine --checkpoint {checkpoint.name}", log)
    return out / build_name(checkpoint)


def optimum_export(checkpoint: Path, folder: Path, log) -> Path:
    """Optimum's ONNX export of the checkpoint (text-generation-with-past), kept for later runs."""
    if (folder / "model.onnx").is_file():
        return folder
    from aim.files import StagedFolder

    with StagedFolder(folder) as staged:
        cli = [sys.executable, "-m", "optimum.commands.optimum_cli", "export", "onnx"]
        task = ["--task", "text-generation-with-past"]
        _child([*cli, "--model", str(checkpoint), *task, str(staged.path)], "optimum-cli export onnx", log)
        staged.publish()
    return folder


def peers(checkpoint: Path, optimum_folder: Path):
    """(Optimum's ORTModelForCausalLM with aim's session options, transformers' eager model, tokenizer)."""
    os.environ.update(OFFLINE)
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aim.runtime.onnxruntime import session_options

    torch.set_num_threads(THREADS)
    options = session_options(THREADS, spinning=False)
    optimum = ORTModelForCausalLM.from_pretrained(optimum_folder, session_options=options, use_io_binding=False)
    eager = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, padding_side="left")
    return optimum, eager, tokenizer


def _torch_generate(model, ids: np.ndarray, mask: np.ndarray, new_tokens: int, pad: int) -> np.ndarray:
    import torch

    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # no early stop: the same work as the others
            do_sample=False,
            pad_token_id=pad,
        )
    return out[:, ids.shape[1] :].numpy()


def variants(engine, bare, optimum, eager, batches: list, new_tokens: int, pad: int, utilities: tuple, state: dict):
    """{name: run()} over the round's batch `batches[state["batch"]]` = (input_ids, attention_mask);
    each run returns its new tokens [B, new_tokens]."""
    from aim.generation import generate

    def loop(runner, utility):
        def run():
            ids, mask = batches[state["batch"]]
            return generate(runner, ids, mask, max_new_tokens=new_tokens, utility=utility, pad_token_id=pad).tokens

        return run

    def peer(model):
        return lambda: _torch_generate(model, *batches[state["batch"]], new_tokens, pad)

    found = {f"engine, utility {u:g}": loop(engine, u) for u in utilities}
    found.update({names.BARE_LOOP: loop(bare, 0.0), names.OPTIMUM: peer(optimum)})
    if eager is not None:
        found[names.TRANSFORMERS] = peer(eager)
    return found


def group_figures(utilities: tuple, batched: int | None, with_eager: bool) -> list[Figure]:
    """tokens/s of the engine over each peer's: ratio(peer's time, engine's time), round by round."""
    found = []
    for u in utilities:
        engine = f"engine, utility {u:g}"
        for peer in (names.OPTIMUM, names.BARE_LOOP) + ((names.TRANSFORMERS,) if with_eager else ()):
            name = names.tokens_per_s(u, peer, batched)
            found.append(Figure(name, ratio(peer, engine), names.TARGETS.get(name)))
    return found


def time_group(
    runs: dict, batches: list, state: dict, figures: list, pairs: int, budget: Budget, settle=(), log=None
) -> dict:
    """Checks that every variant makes the same number of tokens, then times them round-robin."""
    state["batch"] = 0
    made = {name: run() for name, run in runs.items()}
    counts = {name: tokens.shape for name, tokens in made.items()}
    if len(set(counts.values())) != 1:
        raise SystemExit(f"bench: the generators made different numbers of tokens: {counts}")
    rounds = Rounds(runs, warmup=1, settle=settle, before_round=lambda i: state.update(batch=i % len(batches)))
    result = resolve(rounds, figures, pairs, budget, log=log)
    tokens = int(np.prod(next(iter(counts.values()))))
    result["tokens_per_s"] = {name: tokens / (lat["median_ms"] / 1e3) for name, lat in result["latency"].items()}
    result["greedy_agreement"] = {name: float(np.mean(made[name] == made[names.BARE_LOOP])) for name in made}
    return result


def bench_generation(out: Path, quick: bool, log=print, budget: Budget = BUDGET) -> dict:
    """The generation figures: batch 1 (engine at utility 0 and 3, bare loop, Optimum, transformers)
    and batched (8 prompts: engine at utility 3, bare loop, Optimum)."""
    from aim.runtime import onnxruntime as ort_engine
    from aim.runtime.folder import Build

    out.mkdir(parents=True, exist_ok=True)
    label = "llama-tiny" if quick else "llama-135m"
    new_tokens, pairs = (8, 3) if quick else (32, 10)
    log(f"[generation] {label}: {new_tokens} new tokens per prompt, greedy, in {out}")
    checkpoint = make_checkpoint(out / f"{label}.checkpoint", quick)
    folder = build(checkpoint, out / "builds", log)
    optimum_folder = optimum_export(checkpoint, out / f"{label}.optimum", log)
    manifest = Build.open(folder).manifest
    optimum, eager, tokenizer = peers(checkpoint, optimum_folder)
    pad = tokenizer.pad_token_id
    with tempfile.TemporaryDirectory(dir=out) as work:
        bare_engine = ort_engine.build(manifest.graph_path("bare"), Path(work) / "bare.engine.onnx", threads=THREADS)
        engine, bare = (
            quiet_engine(manifest.engine_path(), manifest.profile),
            quiet_engine(bare_engine, manifest.profile),
        )
        single = [tokenizer([p], return_tensors="np") for p in PROMPTS]
        single = [(e["input_ids"].astype(np.int64), e["attention_mask"].astype(np.int64)) for e in single]
        encoded = tokenizer(list(PROMPTS[:BATCH]), padding=True, return_tensors="np")
        batched = [(encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64))]
        utilities = (0.0, names.GENERATION_UTILITY)
        state = {"batch": 0}
        log(f"  generation: batch 1, {len(PROMPTS)} prompts in turn ({pairs} interleaved rounds first)")
        groups = {
            "batch 1": time_group(
                variants(engine, bare, optimum, eager, single, new_tokens, pad, utilities, state),
                single,
                state,
                group_figures(utilities, None, with_eager=True),
                pairs,
                budget,
                settle=(names.TRANSFORMERS,),
                log=log,
            )
        }
        log(f"  generation: {BATCH} prompts at once ({pairs} interleaved rounds first)")
        batched_utility = (names.GENERATION_UTILITY,)
        groups[f"batch {BATCH}"] = time_group(
            variants(engine, bare, optimum, None, batched, new_tokens, pad, batched_utility, state),
            batched,
            state,
            group_figures(batched_utility, BATCH, with_eager=False),
            pairs,
            budget,
            log=log,
        )
        del engine, bare
    return {
        "model": label,
        "checkpoint": str(checkpoint),
        "config": shape(quick),
        "parameters": manifest.source.parameters,
        "new_tokens": new_tokens,
        "prompts": list(PROMPTS),
        "groups": groups,
    }
