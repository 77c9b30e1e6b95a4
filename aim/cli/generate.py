"""aim generate build/llama --prompt TEXT: text from a built language model, streamed token by token."""

from __future__ import annotations

import sys
from pathlib import Path

from aim.cli import args as shared


def add(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a built language model (streamed)")
    p.add_argument("folder", help="a build folder (build/llama) or a model name built under --out")
    p.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="the prompt; repeat for a batch (different lengths are left-padded)",
    )
    shared.utility(p, help="noise scale sigma >= 0 in logit units, every step (0 = original)")
    p.add_argument("--focus", help='tokens to boost or suppress: "+word=5,-other=10,+#123=4" (#N: token id N)')
    p.add_argument(
        "--max-new-tokens",
        type=shared.positive_int,
        default=32,
        help="at most this many (default: 32); prompt + new tokens must fit the build",
    )
    p.add_argument(
        "--truncate",
        action="store_true",
        help="cut a prompt too long for the build to its last tokens (default: refuse it)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument(
        "--top-k", type=shared.non_negative_int, default=0, help="sample among the K most likely tokens (0 = all)"
    )
    shared.seed(p, default=None, help="seeds sampling and the engine's noise")
    shared.out(p)
    p.add_argument("--quiet", action="store_true", help="no streaming: print the texts at the end")
    p.set_defaults(func=run)


def run(args) -> int:
    from aim.generation import generate_text

    folder = Path(args.folder)
    if not folder.is_dir() and (Path(args.out) / args.folder).is_dir():
        folder = Path(args.out) / args.folder  # a model name: its build under --out
    prompts = args.prompt
    streaming = len(prompts) == 1 and not args.quiet
    started = []  # the prompt is printed with the first piece, after any note about the engine

    def stream(piece: str):
        if not started:
            started.append(print(prompts[0], end=""))
        print(piece, end="", flush=True)

    texts, run = generate_text(
        folder,
        prompts,
        utility=args.utility,
        focus=args.focus,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        stream=stream if streaming else None,
        log=lambda note: print(f"note: {note}", file=sys.stderr, flush=True),
        truncate=args.truncate,
    )
    if streaming:
        print("" if started else prompts[0])
    else:
        for prompt, text in zip(prompts, texts):
            print(f"{prompt}{text}")
    print(
        f"[{run.tokens.size} tokens in {run.seconds:.2f} s, {run.tokens_per_second:.0f} tokens/s; "
        f"utility {args.utility:g}{', focus ' + args.focus if args.focus else ''}]",
        file=sys.stderr,
    )
    return 0
