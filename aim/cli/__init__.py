"""`aim`: a thin command line over the Python API, one module per command.

    aim models                                   the model families, and checkpoint architectures by task
    aim engine MODEL [--checkpoint DIR] [--backend auto|onnxruntime|tensorrt|tensorrt-rtx] [--precision fp32|fp16]
                     [--noise fresh|keyed] [--noise-key FILE]
                                                 export -> passes -> engine -> verify into build/MODEL/
    aim engine --checkpoint DIR                  the same for the folder's own architecture, into build/<folder name>/
    aim engine --onnx yours.onnx --logits NAME --min-shapes x:1x3x224x224 --max-shapes x:32x3x224x224
                                                 the same for your own ONNX, into build/yours/
    aim trt-check model.onnx                     which nodes TensorRT's ONNX parser would refuse, and why
    aim export [MODEL] -o model.onnx [--checkpoint DIR]   trace a family (or the checkpoint's architecture) to ONNX
    aim modulate in.onnx -o out.onnx --logits NAME [--class-axis 1] [--flavour verification] [--upsample-to INPUT]
                 [--noise keyed] [--noise-key FILE]
    aim build modulated.onnx -o engine.onnx      an ONNX Runtime engine (optimised model)
    aim build modulated.onnx -o engine.plan --backend tensorrt-rtx --model resnet   a TensorRT plan
    aim build modulated.onnx -o engine.plan --backend tensorrt-rtx --max-shapes x:32x3x224x224  (trtexec's shape flags)
    aim run engine.onnx --input NAME=file.npy --utility 0.5 --boost 3=4 --suppress 0=4 [-o out.npy]
    aim run build/MODEL --input NAME=file.npy    a build's engine: hashes checked, shapes outside its range refused
    aim run engine.calibrated.onnxruntime.onnx --input NAME=file.npy --level 0.8   (a calibrated engine)
    aim verify build/MODEL [--seed N]            re-run the checks of a build against its stored reference
    aim generate build/llama --prompt TEXT [--utility 0.5] [--focus "+word=5,-other=10"]
                 [--max-new-tokens 32] [--truncate]
                                                 text from a built language model, streamed token by token
    aim train MODEL                              train the family's small model on package-shipped data (cached)
    aim eval MODEL [--checkpoint DIR]            utility and focus sweeps through the engine vs theory
    aim calibrate MODEL [--checkpoint DIR]       level -> sigma table; an engine taking utility_level
    aim calibrate build/yours --data x.npy       the same on your unlabelled inputs (or --onnx FILE ... --data x.npy)
    aim attack MODEL [--noise-key FILE]          repeat-and-average attack on fresh vs keyed noise
    aim triton build/MODEL [--repository build/triton]   a Triton model repository for the build's engine
    aim serve build/triton [--model NAME]        the Triton server on a repository (Ctrl-C stops it)
    aim loadtest build/MODEL [--concurrency 1,8,32,128]   modulated beside bare on the real server, under load

A mistake of the user's (a bad argument, a missing file, a corrupt model, a path that cannot be
written, a full disk) ends with one `error:` line and exit code 2; a bug still shows its traceback.
Ctrl-C and SIGTERM remove what the process has half-written and exit with 130 and 143.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import signal
import sys
import threading

from aim.errors import AimError
from aim.files import remove_pending

COMMANDS = (
    "models",
    "engine",
    "trt_check",
    "export",
    "modulate",
    "engine_file",
    "run",
    "verify",
    "generate",
    "train",
    "evaluate",
    "attack",
    "triton",
    "serve",
    "loadtest",
)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="aim", description="AIM model modulation: export, modulate, build, run, verify.")
    sub = top.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add(sub)
    return top


# Options whose value is free text that may start with "-" (`--focus "-import=100"`, a prompt
# "-x"): argparse would take such a value for an option, so "--focus VALUE" becomes "--focus=VALUE".
FREE_TEXT = ("--prompt", "--focus")

# OS errors that are the user's or the machine's, not the program's (a path missing, taken, unwritable
# or read-only, a full disk, a file-size limit), with what to do. Any other OSError is a bug and keeps
# its traceback.
_IN_THE_WAY = "a file or folder is in the way: pick another path, or move that one"
_NO_WRITE = "write somewhere you may write"
_NO_SPACE = "free some space (or raise the limit) and run again"
USER_ERRNOS = {
    errno.ENOENT: "check the path",
    errno.ENOTDIR: _IN_THE_WAY,
    errno.EISDIR: _IN_THE_WAY,
    errno.EEXIST: _IN_THE_WAY,
    errno.ENOTEMPTY: _IN_THE_WAY,
    errno.EACCES: _NO_WRITE,
    errno.EPERM: _NO_WRITE,
    errno.EROFS: _NO_WRITE,
    errno.ENOSPC: _NO_SPACE,
    errno.EDQUOT: _NO_SPACE,
    errno.EFBIG: _NO_SPACE,
    errno.ENAMETOOLONG: "use a shorter path",
    errno.ELOOP: "check the path's symbolic links",
}


def _free_text(argv: list[str]) -> list[str]:
    joined, args = [], iter(argv)
    for arg in args:
        value = next(args, None) if arg in FREE_TEXT else None
        joined.append(f"{arg}={value}" if value is not None else arg)
    return joined


def describe_os_error(error: OSError) -> str:
    """One line for an OS error on a user's path: what happened, where, and what to do."""
    where = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
    what = error.strerror or errno.errorcode.get(error.errno, str(error))
    return f"{where + ': ' if where else ''}{what}: {USER_ERRNOS[error.errno]}"


def _stop(signum, frame):
    """Ctrl-C or SIGTERM (a timeout, a cancelled job): what this process has half-written is removed
    and it exits at once (130 for SIGINT, 143 for SIGTERM). Not by raising KeyboardInterrupt: raised
    where the signal lands, it is swallowed when that is a finalizer (a __del__), and the work goes on
    after a traceback."""
    remove_pending()
    os.write(2, b"interrupted\n")
    os._exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(_free_text(sys.argv[1:] if argv is None else list(argv)))
    handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    # a signal the caller ignores (a background job's SIGINT) stays ignored
    previous = {
        number: signal.signal(number, _stop) for number in handled if signal.getsignal(number) is not signal.SIG_IGN
    }
    try:
        return args.func(args)
    except AimError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in USER_ERRNOS:
            raise  # not a path or a machine limit: a bug, which keeps its traceback
        print(f"error: {describe_os_error(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)  # a caller in the same process (tests) gets its own back


if __name__ == "__main__":
    sys.exit(main())
