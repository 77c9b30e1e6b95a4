"""The generation figure's machinery without a model: every generator must make the same number of
tokens before any is timed, and tokens/s ratios read as the engine's throughput over its peer's."""

import numpy as np
import pytest

from aim.benchmarks import figures as names
from aim.benchmarks.confidence import Budget
from aim.benchmarks.generation import group_figures, time_group


def fake_runs(tokens: dict[str, int]):
    return {name: (lambda n=n: np.zeros((1, n), np.int64)) for name, n in tokens.items()}


def test_generators_that_make_different_numbers_of_tokens_are_refused_before_timing():
    """A peer that stops early (an end-of-sequence token) would look faster: the bench refuses it."""
    runs = fake_runs({"engine, utility 3": 32, names.OPTIMUM: 31, names.BARE_LOOP: 32})
    with pytest.raises(SystemExit, match="different numbers of tokens"):
        time_group(runs, [None], {}, group_figures((3.0,), None, with_eager=False), 3, Budget(seconds=0))


def test_tokens_per_second_ratios_are_the_peers_time_over_the_engines():
    figure = {f.name: f for f in group_figures((3.0,), None, with_eager=False)}[names.tokens_per_s(3.0, names.OPTIMUM)]
    times = {"engine, utility 3": np.array([1.0, 2.0]), names.OPTIMUM: np.array([2.0, 3.0])}
    np.testing.assert_allclose(figure.per_round(times), [2.0, 1.5])  # the engine made the tokens faster
    assert str(figure.target) == ">= 1"


def test_every_import_of_the_bench_resolves():
    """The bench imports most of the package lazily, inside the function that needs it, and its
    slowest parts (the 135M checkpoint, Optimum) run in no test: a module that moved would surface
    only in `make bench`. Every `from aim... import name` of aim/benchmarks must resolve."""
    import ast
    import importlib
    import importlib.util
    from pathlib import Path

    import aim.benchmarks

    missing = []
    for path in Path(aim.benchmarks.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aim"):
                try:
                    module = importlib.import_module(node.module)
                except ModuleNotFoundError:
                    missing.append(f"{path.name}: {node.module}")
                    continue
                for alias in node.names:
                    submodule = hasattr(module, "__path__") and importlib.util.find_spec(f"{node.module}.{alias.name}")
                    if not hasattr(module, alias.name) and not submodule:
                        missing.append(f"{path.name}: {node.module}.{alias.name}")
    assert not missing, missing
