"""`aim`: a thin command line over the Python API (exporter, graph_passes, engines).

    aim models                                   the model families that exist
    aim engine MODEL [--checkpoint DIR]          export -> passes -> engine -> verify into build/MODEL/
    aim export MODEL -o model.onnx               trace a family to ONNX
    aim modulate in.onnx -o out.onnx --logits NAME [--class-axis 1] [--flavour verification] [--upsample-to INPUT]
    aim build modulated.onnx -o engine.onnx      an ONNX Runtime engine (optimised model)
    aim run engine.onnx --input NAME=file.npy --utility 0.5 --boost 3=4 --suppress 0=4 [-o out.npy]
    aim run engine.calibrated.onnxruntime.onnx --input NAME=file.npy --level 0.8   (a calibrated engine)
    aim verify build/MODEL                       re-run the checks of a build against its PyTorch reference
    aim train MODEL                              train the family's small model on package-shipped data (cached)
    aim eval MODEL [--checkpoint DIR]            utility and focus sweeps through the engine vs theory
    aim calibrate MODEL [--checkpoint DIR]       level -> sigma table; an engine taking utility_level
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from errors import AimError


def cmd_models(args) -> int:
    from exporter import get_config, list_models

    for name in list_models():
        config = get_config(name)
        print(f"{name:10} {config.task:22} inputs: {', '.join(s.name for s in config.inputs)}")
    return 0


def cmd_engine(args) -> int:
    from engines.pipeline import build_model, report

    manifest = build_model(args.model, args.out, args.checkpoint, args.backend, args.seed)
    print(report(manifest))
    return 0


def cmd_export(args) -> int:
    from exporter import export_onnx, get_config, load_model

    config = get_config(args.model)
    path = export_onnx(config, load_model(config, args.checkpoint, args.seed), args.output)
    print(f"exported {config.name} to {path}")
    return 0


def cmd_modulate(args) -> int:
    from graph_passes.modulate import modulate_file

    path = modulate_file(args.input, args.output, args.logits, args.class_axis, args.flavour, args.upsample_to)
    print(f"wrote {args.flavour} flavour to {path}: inputs utility [B], focus [B, C] added on {args.logits!r}")
    return 0


def cmd_build(args) -> int:
    from engines.onnxruntime import build

    print(f"built ONNX Runtime engine {build(args.input, args.output, args.threads)}")
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

    from engines.onnxruntime import OnnxRuntimeEngine
    from graph_passes.redistribution import focus_vector

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


def cmd_verify(args) -> int:
    from engines.pipeline import verify_folder

    manifest = verify_folder(args.folder)
    for check in manifest["verification"]["checks"]:
        print(f"{'PASS' if check['passed'] else 'FAIL'}  {check['name']}: {check['detail']}")
    return 0 if manifest["verification"]["passed"] else 1


def cmd_train(args) -> int:
    from evaluation.train import train

    result = train(args.model, args.out, args.steps, args.seed, args.force)
    print(f"{args.model}: clean {result['metric']} {result['clean_metric']:.4f} on {result['test_samples']} test samples, "
          f"trained in {result['train_seconds']} s; checkpoint {result['checkpoint']}")
    return 0


def cmd_eval(args) -> int:
    from evaluation.sweep import evaluate, report

    print(report(evaluate(args.model, args.out, args.checkpoint, args.repeats, boost=args.boost, suppress=args.suppress, seed=args.seed)))
    return 0


def cmd_calibrate(args) -> int:
    from evaluation.calibrate import calibrate, report

    print(report(calibrate(args.model, args.out, args.checkpoint, seed=args.seed)))
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="aim", description="AIM model modulation: export, modulate, build, run, verify.")
    sub = top.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the model families").set_defaults(func=cmd_models)

    p = sub.add_parser("engine", help="the whole pipeline for one model family, into OUT/MODEL/")
    p.add_argument("model", help="model family (see `aim models`)")
    p.add_argument("--checkpoint", help="a local save_pretrained folder (default: tiny config, random weights)")
    p.add_argument("--out", default="build", help="output root (default: build)")
    p.add_argument("--backend", default="onnxruntime")
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

    p = sub.add_parser("build", help="build an ONNX Runtime engine from an ONNX file")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True)
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

    p = sub.add_parser("verify", help="re-run a build's checks against its stored PyTorch reference")
    p.add_argument("folder", help="a build folder, e.g. build/resnet")
    p.set_defaults(func=cmd_verify)

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
