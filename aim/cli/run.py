"""aim run engine.onnx|build/MODEL --input NAME=file.npy [--utility S] [--boost C=S] [--suppress C=S] [--level L].

A build folder (or an engine file in one) is opened with its files' hashes checked, and shapes
outside the range it was built for are refused before anything runs."""

from __future__ import annotations

from pathlib import Path

from aim.cli import args as shared
from aim.errors import AimError


def add(sub) -> None:
    p = sub.add_parser("run", help="run an engine with given utility and focus")
    p.add_argument("engine", help="an ONNX engine or model file, or a build folder (its engine)")
    p.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy")
    shared.utility(p)
    p.add_argument(
        "--level", type=float, help="calibrated engines (aim calibrate): utility level in [0, 1], 1 = original"
    )
    p.add_argument("--boost", action="append", default=[], metavar="CLASS=STRENGTH")
    p.add_argument("--suppress", action="append", default=[], metavar="CLASS=STRENGTH")
    p.add_argument("-o", "--output", help="save the logits as .npy")
    p.add_argument(
        "--allow-failed",
        action="store_true",
        help="run a build whose verification failed (NAME.failed), with a warning: to look into why, never to serve",
    )
    shared.threads(p)
    p.set_defaults(func=run)


def _parse_classes(pairs: list[str], flag: str) -> dict[int, float]:
    chosen = {}
    for pair in pairs:
        index, _, strength = pair.partition("=")
        try:
            chosen[int(index)] = float(strength)
        except ValueError:
            raise AimError(f"{flag} takes CLASS=STRENGTH, e.g. {flag} 3=4.0; got {pair!r}") from None
    return chosen


def _load(item: str):
    import numpy as np

    from aim.files import load_arrays

    name, _, file = item.partition("=")
    if not file or not Path(file).is_file():
        raise AimError(f"--input takes NAME=FILE.npy with an existing file; got {item!r}")
    try:
        array = load_arrays(file)  # each header checked against the file's size before it is read
        if not isinstance(array, np.ndarray):
            array.close()
            raise ValueError("it is an .npz archive; give one array per --input, saved with numpy.save")
        return name, array
    except (OSError, ValueError) as error:
        raise AimError(f"--input {item}: not a readable .npy file ({error})") from None


def _run(engine, inputs, utility, focus, level):
    """engine.run, with ONNX Runtime's own failures on these inputs (a shape the model's nodes do not
    take, memory it cannot allocate) said in one line: the inputs are the user's, the engine too."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

    try:
        return engine.run(inputs, utility, focus, level=level)
    except (Fail, InvalidArgument, RuntimeException) as error:
        shapes = {name: list(value.shape) for name, value in inputs.items()}
        raise AimError(
            f"ONNX Runtime could not run {engine.name} on inputs {shapes}: {str(error).strip()[:500]}"
        ) from error


def run(args) -> int:
    import sys

    import numpy as np

    from aim.contract import focus_vector
    from aim.files import atomic_path
    from aim.runtime.folder import open_runner

    inputs = dict(_load(item) for item in args.input)
    warn = lambda line: print(line, file=sys.stderr)  # noqa: E731
    with open_runner(args.engine, args.threads, args.allow_failed, warn) as engine:
        focus = None
        if args.boost or args.suppress:
            if not (engine.modulated or engine.calibrated):
                raise AimError(f"{args.engine} is not modulated: it has no focus input")
            focus = focus_vector(
                engine.num_classes, _parse_classes(args.boost, "--boost"), _parse_classes(args.suppress, "--suppress")
            )
        logits = _run(engine, inputs, args.utility, focus, args.level)
    if args.output:
        with atomic_path(args.output) as tmp, open(tmp, "wb") as handle:
            np.save(handle, logits)
    top = np.argmax(logits, axis=1)
    print(f"logits {list(logits.shape)}; argmax over classes of the first sample: {np.ravel(top[0])[:16].tolist()}")
    return 0
