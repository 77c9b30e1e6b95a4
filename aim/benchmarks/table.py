"""`make bench`'s table: each figure with its 95% interval, the pairs it rests on, its target and verdict."""

from __future__ import annotations

from aim.benchmarks import figures as names

HEADER = ("figure", "model", "value", "95% interval", "pairs", "target", "verdict")


def _shown(name: str, value: float) -> str:
    return f"{value / 1024:.1f} KiB" if name.startswith(names.ENGINE_BYTES) else f"{value:.3f}"


def _interval(name: str, figure: dict) -> str:
    if figure["pairs"] == 1:
        return "one measurement"
    low, high = figure["low"], figure["high"]
    if low is None or high is None:
        return "too few pairs"
    return f"{_shown(name, low)}..{_shown(name, high)}"


def _target(name: str, target: str) -> str:
    if name.startswith(names.ENGINE_BYTES) and target:
        comparison, bound = target.split()
        return f"{comparison} {float(bound) / 1e6:g} MB"
    return target


def figure_row(name: str, model: str, figure: dict) -> tuple:
    return (
        name,
        model,
        _shown(name, figure["value"]),
        _interval(name, figure),
        str(figure["pairs"]),
        _target(name, figure.get("target", "")),
        figure.get("verdict", ""),
    )


def table(results: dict) -> str:
    """Every figure of a bench run (bench.json's content) as a plain-text table."""
    rows = [HEADER]
    for model, result in results["families"].items():
        rows += [figure_row(name, model, figure) for name, figure in result["figures"].items()]
        for key, label in (("checks_passed", "checks"), ("keyed_checks_passed", "keyed checks")):
            rows.append(
                (
                    label,
                    model,
                    "passed" if result[key] else "FAILED",
                    "",
                    "",
                    "all pass",
                    "met" if result[key] else "missed",
                )
            )
    for model, noise in results["noise"].items():
        rows += [figure_row(name, f"{model} {noise['shape']}", figure) for name, figure in noise["figures"].items()]
    generation = results.get("generation")
    if generation:
        for group in generation["groups"].values():
            rows += [figure_row(name, generation["model"], figure) for name, figure in group["figures"].items()]
        for label, group in generation["groups"].items():
            for variant, rate in group["tokens_per_s"].items():
                row = (f"tokens/s, {variant}, {label}", generation["model"], f"{rate:.1f}", "", str(group["pairs"]))
                rows.append((*row, "", ""))
    if names.MAKE_ENGINE in results:
        walls = results[names.MAKE_ENGINE]["wall_s"]
        model = results[names.MAKE_ENGINE]["model"]
        rows.append(
            (names.MAKE_ENGINE, model, f"cold {walls['cold']:.1f} s, warm {walls['warm']:.1f} s", "", "", "", "")
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(HEADER))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    note = results.get("intervals", {})
    if note:
        lines.append(f"intervals: {note['confidence']}; unresolved targets get more rounds, {note['budget']}")
    return "\n".join(lines)
