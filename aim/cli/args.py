"""Argument groups several commands share."""

from __future__ import annotations

import argparse

from aim.contract import MAX_STRENGTH, NOISE_SOURCES
from aim.runtime.backends import BACKENDS


class Parser(argparse.ArgumentParser):
    """argparse's parser, its mistakes said in one `error:` line with where to read more, as every
    other mistake of the user's is (argparse prints its usage first, 4 to 10 lines)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}; see `{self.prog} --help`\n")


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 1..65535 (0: any free port), got {value}")
    return value


def seed(
    parser: argparse.ArgumentParser, default: int | None = 0, help: str = "seed of everything random (default: 0)"
) -> None:
    parser.add_argument("--seed", type=non_negative_int, default=default, help=help)


def out(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="build", help="output root (default: build)")


def backend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="auto: TensorRT with a CUDA GPU and tensorrt installed, else ONNX Runtime; tensorrt-rtx builds "
        "on any machine",
    )


def precision(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "fp16", "int4", "int8"),
        help="fp16 is written into the graph; int4/int8: weight-only MatMulNBits, an ONNX Runtime CPU engine; "
        "the redistribution stays fp32",
    )


def threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=positive_int, help="ONNX Runtime intra-op threads (default: its own choice)")


def utility(
    parser: argparse.ArgumentParser, help: str = "noise scale sigma >= 0, in logit units (0 = original)"
) -> None:
    parser.add_argument("--utility", type=float, default=0.0, help=f"{help}; at most {MAX_STRENGTH:g}")


def noise(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--noise",
        default="fresh",
        choices=NOISE_SOURCES,
        help="fresh: drawn anew on every run (default); keyed: a function of the request and a secret key, "
        "so the same request gets the same answer and repeating it cannot average the noise away",
    )
    parser.add_argument(
        "--noise-key",
        metavar="FILE",
        help="keyed noise: the key file to build with; a fresh key is written there (mode 600) if it does not exist, "
        "so rebuilds answer as before (default: a fresh key, kept only inside the engine)",
    )


def onnx_source(parser: argparse.ArgumentParser) -> None:
    """A user's own ONNX instead of a model family (aim engine, aim calibrate)."""
    group = parser.add_argument_group("a model of your own, instead of MODEL")
    group.add_argument(
        "--onnx",
        metavar="FILE.onnx",
        help="your ONNX model: built into OUT/<file stem>/, verified against itself on ONNX Runtime",
    )
    group.add_argument("--logits", default="logits", help="name of its logits output (default: logits)")
    group.add_argument("--class-axis", type=int, help="axis of the classes in the logits (default: the task's, 1)")
    group.add_argument(
        "--task",
        default="image-classification",
        help="what the logits are for: the FP16 comparator (default: image-classification)",
    )
    group.add_argument(
        "--inputs",
        metavar="DATA.npz",
        help="verification inputs, one array per graph input (default: drawn from the graph's types and shapes)",
    )
    group.add_argument(
        "--upsample-to",
        metavar="INPUT",
        help="segmentation: resize the logits [B, C, h, w] to this input's spatial size (bilinear) before the "
        "modulation, so it acts per input pixel",
    )
    shapes(group)


def shapes(parser) -> None:
    """trtexec's --minShapes/--optShapes/--maxShapes: the range of every dynamic dim."""
    for bound in ("min", "opt", "max"):
        parser.add_argument(
            f"--{bound}-shapes",
            metavar="NAME:1x3x224x224,...",
            help=f"{bound} shape of inputs with dynamic dims (trtexec's --{bound}Shapes)",
        )
