"""Argument groups several commands share."""

from __future__ import annotations

import argparse

from aim.contract import MAX_STRENGTH
from aim.runtime.backends import BACKENDS


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


def seed(parser: argparse.ArgumentParser, default: int | None = 0, help: str = "seed of everything random (default: 0)") -> None:
    parser.add_argument("--seed", type=non_negative_int, default=default, help=help)


def out(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="build", help="output root (default: build)")


def backend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend", default="auto", choices=BACKENDS,
        help="auto: TensorRT with a CUDA GPU and tensorrt installed, else ONNX Runtime; tensorrt-rtx builds on any machine",
    )


def precision(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16"), help="fp16 is written into the graph; the redistribution stays fp32")


def threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=positive_int, help="ONNX Runtime intra-op threads (default: its own choice)")


def utility(parser: argparse.ArgumentParser, help: str = "noise scale sigma >= 0, in logit units (0 = original)") -> None:
    parser.add_argument("--utility", type=float, default=0.0, help=f"{help}; at most {MAX_STRENGTH:g}")
