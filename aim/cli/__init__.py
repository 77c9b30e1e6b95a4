"""`aim`: a thin command line over the Python API (exporter, graph_passes, engines).

    aim models                                   the model families that exist
    aim engine MODEL [--checkpoint DIR] [--backend auto|onnxruntime|tensorrt|tensorrt-rtx] [--precision fp32|fp16]
                                                 export -> passes -> engine -> verify into build/MODEL/
    aim trt-check model.onnx                     which nodes TensorRT's ONNX parser would refuse, and why
    aim export MODEL -o model.onnx               trace a family to ONNX
    aim modulate in.onnx -o out.onnx --logits NAME [--class-axis 1] [--flavour verification] [--upsample-to INPUT]
    aim build modulated.onnx -o engine.onnx      an ONNX Runtime engine (optimised model)
    aim build modulated.onnx -o engine.plan --backend tensorrt-rtx --model resnet   a TensorRT plan
    aim run engine.onnx --input NAME=file.npy --utility 0.5 --boost 3=4 --suppress 0=4 [-o out.npy]
    aim run engine.calibrated.onnxruntime.onnx --input NAME=file.npy --level 0.8   (a calibrated engine)
    aim verify build/MODEL                       re-run the checks of a build against its PyTorch reference
    aim generate build/llama --prompt TEXT [--utility 0.5] [--focus "+word=5,-other=10"] [--max-new-tokens 32]
                                                 text from a built language model, streamed token by token
    aim train MODEL                              train the family's small model on package-shipped data (cached)
    aim eval MODEL [--checkpoint DIR]            utility and focus sweeps through the engine vs theory
    aim calibrate MODEL [--checkpoint DIR]       level -> sigma table; an engine taking utility_level
    aim triton build/MODEL [--repository build/triton]   a Triton model repository for the build's engine
    aim serve build/triton [--model NAME]        the Triton server on a repository (Ctrl-C stops it)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aim.errors import AimError


def cmd_models(args) -> int:
    from aim.families import get_config, list_models

    for name in list_models():
        config = get_config(name)
        print(f"{name:10} {config.task:22} inputs: {', '.join(s.name for s in config.inputs)}")
    return 0


def cmd_engine(args) -> int:
    from aim.pipeline.build import build_model, report

    manifest = build_model(args.model, args.out, args.checkpoint, args.backend, args.seed, precision=args.precision)
    print(report(manifest))
    return 0


def cmd_export(args) -> int:
    from aim.families import export_onnx, get_config, load_model

    config = get_config(args.model)
    path = export_onnx(config, load_model(config, args.checkpoint, args.seed), args.output)
    print(f"exported {config.name} to {path}")
    return 0


def cmd_modulate(args) -> int:
    from aim.graph_passes.modulate import modulate_file

    path = modulate_file(args.input, args.output, args.logits, args.class_axis, args.flavour, args.upsample_to)
    print(f"wrote {args.flavour} flavour to {path}: inputs utility [B], focus [B, C] added on {args.logits!r}")
    return 0


def cmd_build(args) -> int:
    if args.backend == "onnxruntime":
        from aim.runtime.onnxruntime import build

        print(f"built ONNX Runtime engine {build(args.input, args.output, args.threads)}")
        return 0
    from dataclasses import asdict

    from aim.layout import graph_io
    from aim.runtime.tensorrt import build_engine, profile_from_io
    from aim.families import get_config
    from aim.graph_passes.trt_support import check_tensorrt_support

    if not args.model:
        raise AimError("a TensorRT engine needs the range of every dynamic dim: pass --model FAMILY, whose config's DimRanges make the profile")
    check_tensorrt_support(args.input, backend=args.backend).raise_if_unsupported(args.input)
    dims = {name: asdict(rng) for name, rng in get_config(args.model).dims.items()}
    result = build_engine(args.input, args.output, args.backend, profile_from_io(graph_io(args.input)["inputs"], dims))
    print(f"built {args.backend} {result.version} engine {result.path}: {result.bytes / 1e6:.1f} MB in {result.seconds:.1f} s")
    for name, shapes in result.profile.items():
        print(f"  profile {name}: min {shapes['min']}, opt {shapes['opt']}, max {shapes['max']}")
    return 0


def _parse_classes(pairs: list[str], flag: str) -> dict[int, float]:
    chosen = {}
    for pair in pairs:
        index, _, strength = pair.partition("=")
        try:
            chosen[int(index)] = float(strength)
        except ValueError:
            raise AimError(f"{flag} takes CLASS=STRENGTH, e.g. {flag} 3=4.0; got {pair!r}") from None
    return chosen


def cmd_run(args) -> int:
    import numpy as np

    from aim.runtime.onnxruntime import OnnxRuntimeEngine
    from aim.graph_passes.redistribution import focus_vector

    engine = OnnxRuntimeEngine(args.engine, args.threads)
    inputs = {}
    for item in args.input:
        name, _, file = item.partition("=")
        if not file or not Path(file).is_file():
            raise AimError(f"--input takes NAME=FILE.npy with an existing file; got {item!r}")
        inputs[name] = np.load(file)
    focus = None
    if args.boost or args.suppress:
        if not (engine.modulated or engine.calibrated):
            raise AimError(f"{args.engine} is not modulated: it has no focus input")
        focus = focus_vector(engine.num_classes, _parse_classes(args.boost, "--boost"), _parse_classes(args.suppress, "--suppress"))
    logits = engine.run(inputs, args.utility, focus, level=args.level)
    if args.output:
        np.save(args.output, logits)
    top = np.argmax(logits, axis=1)
    print(f"logits {list(logits.shape)}; argmax over classes of the first sample: {np.ravel(top[0])[:16].tolist()}")
    return 0


def cmd_trt_check(args) -> int:
    from aim.graph_passes.trt_support import check_tensorrt_support

    report = check_tensorrt_support(args.input, backend=args.backend)
    print(report.summary())
    return 0 if report.ok else 1


def cmd_verify(args) -> int:
    from aim.pipeline.build import verify_folder

    manifest = verify_folder(args.folder)
    for check in manifest["verification"]["checks"]:
        print(f"{'PASS' if check['passed'] else 'FAIL'}  {check['name']}: {check['detail']}")
    engine_run = manifest["verification"].get("engine_run", {"ran": True})
    if not engine_run["ran"]:
        print(f"engine run SKIPPED ({manifest['engine']}): {engine_run['reason']}; the checks ran on ONNX Runtime over the graphs it was built from")
    return 0 if manifest["verification"]["passed"] else 1


def cmd_generate(args) -> int:
    from aim.tasks.generation import generate_text

    folder = Path(args.folder)
    if not folder.is_dir() and (Path(args.out) / args.folder).is_dir():
        folder = Path(args.out) / args.folder  # a model name: its build under --out
    if not (folder / "manifest.json").is_file():
        raise AimError(f"{args.folder}: no build there. Build it first: `make engine MODEL={folder.name}`")
    prompts = args.prompt or [""]
    streaming = len(prompts) == 1 and not args.quiet
    started = []  # the prompt is printed with the first piece, after any note about the engine

    def stream(piece: str):
        if not started:
            started.append(print(prompts[0], end=""))
        print(piece, end="", flush=True)

    texts, run = generate_text(
        folder, prompts, utility=args.utility, focus=args.focus, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, seed=args.seed,
        stream=stream if streaming else None,
        log=lambda note: print(f"note: {note}", file=sys.stderr, flush=True),
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


def cmd_train(args) -> int:
    from aim.evaluation.train import train

    result = train(args.model, args.out, args.steps, args.seed, args.force)
    print(f"{args.model}: clean {result['metric']} {result['clean_metric']:.4f} on {result['test_samples']} test samples, "
          f"trained in {result['train_seconds']} s; checkpoint {result['checkpoint']}")
    return 0


def cmd_eval(args) -> int:
    from aim.evaluation.sweep import evaluate, report

    print(report(evaluate(args.model, args.out, args.checkpoint, args.repeats, boost=args.boost, suppress=args.suppress, seed=args.seed)))
    return 0


def cmd_calibrate(args) -> int:
    from aim.evaluation.calibrate import calibrate, report

    print(report(calibrate(args.model, args.out, args.checkpoint, seed=args.seed)))
    return 0


def cmd_triton(args) -> int:
    from aim.serving.triton import CONFIG, MAX_QUEUE_DELAY_US, write_model

    delay = MAX_QUEUE_DELAY_US if args.max_queue_delay_us is None else args.max_queue_delay_us
    folder = write_model(args.build, args.repository, args.name, args.engine, delay)
    print(f"wrote {folder}/{CONFIG} and {', '.join(str(p.relative_to(folder)) for p in sorted(folder.glob('*/*')))}")
    print((folder / CONFIG).read_text())
    from aim.layout import read_manifest

    if read_manifest(args.build).get("backend") == "tensorrt-rtx":
        print(
            "note: this is a TensorRT for RTX plan: it runs where TensorRT for RTX runs it (an RTX GPU). Triton's "
            "tensorrt backend runs plans of the TensorRT version it was built with; for a data-centre Triton, "
            "build with BACKEND=tensorrt there."
        )
    return 0


def cmd_serve(args) -> int:
    import signal
    import threading

    from aim.serving.server import TritonServer

    repository = Path(args.repository)
    log = repository.with_name(repository.name + ".log")  # kept after the server stops
    server = TritonServer(repository, args.http_port, args.grpc_port, models=args.model or ["*"], host=args.host, log_path=log)
    print(f"starting tritonserver on {args.repository} ...", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with server:
            print(f"HTTP  http://{server.http_url}   (health: http://{server.http_url}/v2/health/ready)")
            print(f"gRPC  {server.grpc_url}")
            print(f"models: {', '.join(server.models_ready())}; log: {server.log_path}. Ctrl-C stops the server.", flush=True)
            while not stop.is_set() and server.running():
                stop.wait(0.5)
            if not server.running():
                print(f"tritonserver exited:\n{server.log()[-2000:]}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        pass  # the with block has stopped the server
    print("stopped")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="aim", description="AIM model modulation: export, modulate, build, run, verify.")
    sub = top.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the model families").set_defaults(func=cmd_models)

    p = sub.add_parser("engine", help="the whole pipeline for one model family, into OUT/MODEL/")
    p.add_argument("model", help="model family (see `aim models`)")
    p.add_argument("--checkpoint", help="a local save_pretrained folder (default: tiny config, random weights)")
    p.add_argument("--out", default="build", help="output root (default: build)")
    p.add_argument(
        "--backend", default="auto", choices=("auto", "onnxruntime", "tensorrt", "tensorrt-rtx"),
        help="auto: TensorRT with a CUDA GPU and tensorrt installed, else ONNX Runtime; tensorrt-rtx builds on any machine",
    )
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16"), help="fp16 is written into the graph; the redistribution stays fp32")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_engine)

    p = sub.add_parser("export", help="trace a model family to ONNX")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("modulate", help="splice the redistribution subgraph onto any ONNX model's logits")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--logits", default="logits", help="name of the logits output (default: logits)")
    p.add_argument("--class-axis", type=int, default=1, help="axis of the classes in the logits (default: 1)")
    p.add_argument("--flavour", choices=("production", "verification"), default="production")
    p.add_argument("--upsample-to", help="resize the logits to this input's spatial size first (segmentation)")
    p.set_defaults(func=cmd_modulate)

    p = sub.add_parser("build", help="build an engine from an ONNX file (ONNX Runtime, or a TensorRT plan)")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt", "tensorrt-rtx"))
    p.add_argument("--model", help="TensorRT: the family whose config gives the dims' ranges (the optimization profile)")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("run", help="run an engine with given utility and focus")
    p.add_argument("engine")
    p.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy")
    p.add_argument("--utility", type=float, default=0.0, help="noise scale sigma >= 0, in logit units (0 = original)")
    p.add_argument("--level", type=float, help="calibrated engines (aim calibrate): utility level in [0, 1], 1 = original")
    p.add_argument("--boost", action="append", default=[], metavar="CLASS=STRENGTH")
    p.add_argument("--suppress", action="append", default=[], metavar="CLASS=STRENGTH")
    p.add_argument("-o", "--output", help="save the logits as .npy")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("trt-check", help="check an ONNX file against TensorRT's ONNX operator matrix (no TensorRT needed)")
    p.add_argument("input")
    p.add_argument("--backend", default="tensorrt", choices=("tensorrt", "tensorrt-rtx"))
    p.set_defaults(func=cmd_trt_check)

    p = sub.add_parser("verify", help="re-run a build's checks against its stored PyTorch reference")
    p.add_argument("folder", help="a build folder, e.g. build/resnet")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("generate", help="generate text with a built language model (streamed)")
    p.add_argument("folder", help="a build folder (build/llama) or a model name built under --out")
    p.add_argument("--prompt", action="append", help="the prompt; repeat for a batch (different lengths are left-padded)")
    p.add_argument("--utility", type=float, default=0.0, help="noise scale sigma >= 0 in logit units, every step (0 = original)")
    p.add_argument("--focus", help='tokens to boost or suppress: "+word=5,-other=10,+#123=4" (#N: token id N)')
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, help="seeds sampling and the engine's noise")
    p.add_argument("--out", default="build", help="build root when FOLDER is a model name (default: build)")
    p.add_argument("--quiet", action="store_true", help="no streaming: print the texts at the end")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train", help="train a family's small model on package-shipped data (cached)")
    p.add_argument("model")
    p.add_argument("--out", help="checkpoint folder (default: build/trained/MODEL)")
    p.add_argument("--steps", type=int, help="optimiser steps (default: the family's recipe)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="retrain even if a checkpoint with these settings exists")
    p.set_defaults(func=cmd_train)

    for name, func, text in (
        ("eval", cmd_eval, "utility and focus sweeps through the engine, measured vs predicted (CSV, plots)"),
        ("calibrate", cmd_calibrate, "invert G on calibration inputs: level -> sigma, and an engine taking utility_level"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("model")
        p.add_argument("--checkpoint", help="a save_pretrained folder (default: the family's trained model, trained if needed)")
        p.add_argument("--out", default="build", help="output root (default: build)")
        p.add_argument("--seed", type=int, default=0)
        if name == "eval":
            p.add_argument("--repeats", type=int, help="engine runs per sweep point (default: per family)")
            p.add_argument("--boost", type=int, help="class to boost (default: the clean model's 2nd most frequent answer)")
            p.add_argument("--suppress", type=int, help="class to suppress (default: its most frequent answer)")
        p.set_defaults(func=func)

    p = sub.add_parser("triton", help="write a Triton model repository entry for a build's engine")
    p.add_argument("build", help="a build folder with manifest.json, e.g. build/resnet")
    p.add_argument("--repository", default="build/triton", help="model repository root (default: build/triton)")
    p.add_argument("--name", help="model name in Triton (default: the manifest's model)")
    p.add_argument("--engine", help="engine file in the build folder (default: the manifest's engine)")
    p.add_argument("--max-queue-delay-us", type=int, help="how long dynamic batching waits for more requests (default: 2000)")
    p.set_defaults(func=cmd_triton)

    p = sub.add_parser("serve", help="run the Triton server on a model repository")
    p.add_argument("repository", nargs="?", default="build/triton")
    p.add_argument("--model", action="append", help="load only this model (repeatable; default: all)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.set_defaults(func=cmd_serve)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (AimError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
