"""`aim`: a thin command line over the Python API, one module per command.

    aim models                                   the model families, and checkpoint architectures by task
    aim engine MODEL [--checkpoint DIR] [--backend auto|onnxruntime|tensorrt|tensorrt-rtx] [--precision fp32|fp16]
                                                 export -> passes -> engine -> verify into build/MODEL/
    aim engine --checkpoint DIR                  the same for the folder's own architecture, into build/<folder name>/
    aim engine --onnx yours.onnx --logits NAME --min-shapes x:1x3x224x224 --max-shapes x:32x3x224x224
                                                 the same for your own ONNX, into build/yours/
    aim trt-check model.onnx                     which nodes TensorRT's ONNX parser would refuse, and why
    aim export [MODEL] -o model.onnx [--checkpoint DIR]   trace a family (or the checkpoint's architecture) to ONNX
    aim modulate in.onnx -o out.onnx --logits NAME [--class-axis 1] [--flavour verification] [--upsample-to INPUT]
    aim build modulated.onnx -o engine.onnx      an ONNX Runtime engine (optimised model)
    aim build modulated.onnx -o engine.plan --backend tensorrt-rtx --model resnet   a TensorRT plan
    aim build modulated.onnx -o engine.plan --backend tensorrt-rtx --max-shapes x:32x3x224x224  (trtexec's shape flags)
    aim run engine.onnx --input NAME=file.npy --utility 0.5 --boost 3=4 --suppress 0=4 [-o out.npy]
    aim run engine.calibrated.onnxruntime.onnx --input NAME=file.npy --level 0.8   (a calibrated engine)
    aim verify build/MODEL [--seed N]            re-run the checks of a build against its stored reference
    aim generate build/llama --prompt TEXT [--utility 0.5] [--focus "+word=5,-other=10"] [--max-new-tokens 32]
                                                 text from a built language model, streamed token by token
    aim train MODEL                              train the family's small model on package-shipped data (cached)
    aim eval MODEL [--checkpoint DIR]            utility and focus sweeps through the engine vs theory
    aim calibrate MODEL [--checkpoint DIR]       level -> sigma table; an engine taking utility_level
    aim calibrate build/yours --data x.npy       the same on your unlabelled inputs (or --onnx FILE ... --data x.npy)
    aim triton build/MODEL [--repository build/triton]   a Triton model repository for the build's engine
    aim serve build/triton [--model NAME]        the Triton server on a repository (Ctrl-C stops it)
    aim loadtest build/MODEL [--concurrency 1,8,32,128]   modulated beside bare on the real server, under load

A mistake of the user's (a bad argument, a missing file, a corrupt model) ends with one `error:` line
and exit code 2; a bug still shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

from aim.errors import AimError

COMMANDS = ("models", "engine", "trt_check", "export", "modulate", "build", "run", "verify", "generate", "train", "evaluate", "triton", "serve", "loadtest")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="aim", description="AIM model modulation: export, modulate, build, run, verify.")
    sub = top.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add(sub)
    return top


def _terminate(signum, frame):
    """SIGTERM (a timeout, a cancelled job) unwinds like Ctrl-C, so staging folders are removed."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except (AimError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
