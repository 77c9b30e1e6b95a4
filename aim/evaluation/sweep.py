"""`make eval MODEL=x`: utility and focus sweeps through the built engine, measured vs predicted.

The engine is the production flavour (in-graph noise) of build/<model>/, built from the trained
checkpoint (or `--checkpoint DIR`). Clean logits come from the same engine at utility 0 and focus 0
(bit for bit the bare model); the theory (evaluation.theory) turns them into predictions:

- utility sweep: top-1 agreement with the clean model vs G(sigma); accuracy (pixel accuracy,
  next-token accuracy) vs its expectation; mIoU for segmentation (measured only);
- boost sweep (focus +w on one class only): P(argmax = k) vs mean 2 (1 - Phi(m / w)), and the recall
  of class k on labelled rows;
- suppress sweep (focus -w on one class only): survival of k where it was on top vs mean
  2 Phi(g / w) - 1, and the recall of class k.

Each point's standard error is the Monte-Carlo one given the inputs, sqrt(mean p (1 - p) / n) with
p the predicted per-row probabilities and n the rows times repeats: measured minus predicted should
be within a few of them. Writes sweep.csv, summary.json, utility.png and focus.png to build/<model>/eval/.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aim.errors import AimError
from aim.evaluation import metrics, theory
from aim.evaluation.datasets import Split
from aim.files import atomic_path, save_figure
from aim.layout import EVAL_DIR

# The reference code's grids (docs/method.md §1).
UTILITY_GRID = {
    "classification": np.round(np.arange(0, 20.0001, 0.2), 4),
    "language": np.round(np.arange(0, 2.0001, 0.1), 4),
}
FOCUS_GRID = np.round(np.arange(0, 20.0001, 0.5), 4)
CSV_FIELDS = ("sweep", "strength", "quantity", "measured", "predicted", "samples", "standard_error")


@dataclass
class Point:
    sweep: str
    strength: float
    quantity: str
    measured: float
    predicted: float | None = None
    samples: int = 0
    standard_error: float | None = None

    def row(self) -> dict:
        return {
            "sweep": self.sweep,
            "strength": self.strength,
            "quantity": self.quantity,
            "measured": self.measured,
            "predicted": "" if self.predicted is None else self.predicted,
            "samples": self.samples,
            "standard_error": "" if self.standard_error is None else self.standard_error,
        }


@dataclass
class EngineData:
    """An engine and a labelled split, with the engine's clean logits (classes on axis 1)."""

    engine: object
    split: Split
    batch: int
    # False when the split's labels are not the model's classes (a foreign checkpoint): only the
    # label-free quantities (agreement, boost rate, survival) are measured then.
    labelled: bool = True
    clean: np.ndarray = field(init=False)
    num_classes: int = field(init=False)

    def __post_init__(self):
        self.num_classes = self.engine.num_classes
        self.clean = self.run(0.0, None)

    def run(self, utility, focus) -> np.ndarray:
        """Logits of the whole split in batches: utility a sigma (or, for a calibrated engine, a level)."""
        out = []
        for start in range(0, len(self.split), self.batch):
            part = {k: v[start : start + self.batch] for k, v in self.split.inputs.items()}
            out.append(self.engine.run(part, utility, focus))
        return np.concatenate(out)

    @property
    def labels(self) -> np.ndarray:
        return self.split.labels.reshape(-1)

    def rows(self, logits: np.ndarray) -> np.ndarray:
        return np.moveaxis(logits, 1, -1).reshape(-1, logits.shape[1])

    def predictions(self, logits: np.ndarray) -> np.ndarray:
        return np.argmax(logits, axis=1).reshape(-1)


def _se(p: np.ndarray, repeats: int) -> float:
    """Monte-Carlo standard error of a mean of Bernoulli(p_i) over rows, each drawn `repeats` times."""
    return float(np.sqrt(np.mean(p * (1 - p)) / (p.size * repeats))) if p.size else float("nan")


def utility_sweep(
    data: EngineData, sigmas, repeats: int = 1, log: Callable = print, segmentation: bool = False
) -> list[Point]:
    rows = data.rows(data.clean)
    clean = data.predictions(data.clean)
    labels = data.labels
    points = []
    for i, sigma in enumerate(np.asarray(sigmas, dtype=float)):
        p_agree = theory.win_probability(rows, clean, sigma)
        p_label = theory.win_probability(rows, labels, sigma) if data.labelled else np.full(rows.shape[0], np.nan)
        agrees, corrects, ious = [], [], []
        for _ in range(repeats):
            logits = data.run(float(sigma), None)
            predicted = data.predictions(logits)
            agrees.append(metrics.agreement(predicted, clean))
            corrects.append(metrics.accuracy(predicted, labels))
            if segmentation and data.labelled:
                ious.append(metrics.mean_iou(predicted, labels, data.num_classes))
        agree, correct = float(np.mean(agrees)), float(np.mean(corrects))
        n = rows.shape[0] * repeats
        points.append(
            Point("utility", float(sigma), "agreement", agree, float(p_agree.mean()), n, _se(p_agree, repeats))
        )
        if data.labelled:
            points.append(
                Point("utility", float(sigma), "accuracy", correct, float(p_label.mean()), n, _se(p_label, repeats))
            )
        if segmentation and data.labelled:
            points.append(Point("utility", float(sigma), "mIoU", float(np.mean(ious)), None, n))
        if i % 10 == 0:
            log(
                f"  utility {sigma:6.2f}: agreement {agree:.4f} (G {p_agree.mean():.4f})"
                + (f", accuracy {correct:.4f} (expected {p_label.mean():.4f})" if data.labelled else "")
            )
    return points


def focus_sweep(
    data: EngineData, cls: int, mode: str, strengths, repeats: int = 1, log: Callable = print
) -> list[Point]:
    """Focus on one class only: mode "boost" (+w) or "suppress" (-w)."""
    rows = data.rows(data.clean)
    clean = data.predictions(data.clean)
    labels = data.labels
    on_top = clean == cls
    labelled = labels == cls
    points = []
    for i, w in enumerate(np.asarray(strengths, dtype=float)):
        focus = np.zeros([data.num_classes], dtype=np.float32)
        focus[cls] = w if mode == "boost" else -w
        if mode == "boost":
            p = theory.boost_win_probability(rows, cls, w)[0]
            mask, quantity = np.ones_like(on_top), "boost_rate"
        else:
            p = theory.suppress_survival_probability(rows, cls, w)[0]
            mask, quantity = on_top, "survival"
        rates, recalls = [], []
        for _ in range(repeats):
            predicted = data.predictions(data.run(0.0, focus))
            rates.append(float(np.mean(predicted[mask] == cls)) if mask.any() else float("nan"))
            recalls.append(metrics.class_recall(predicted, labels, cls))
        rate, recall = float(np.mean(rates)), float(np.mean(recalls))
        points.append(
            Point(
                mode,
                float(w),
                quantity,
                rate,
                float(p[mask].mean()) if mask.any() else None,
                int(mask.sum()) * repeats,
                _se(p[mask], repeats),
            )
        )
        if data.labelled:
            points.append(
                Point(
                    mode,
                    float(w),
                    f"recall_class_{cls}",
                    recall,
                    float(p[labelled].mean()) if labelled.any() else None,
                    int(labelled.sum()) * repeats,
                    _se(p[labelled], repeats),
                )
            )
        if i % 10 == 0:
            log(
                f"  {mode} class {cls} by {w:5.1f}: {quantity} {rate:.4f} (predicted "
                f"{p[mask].mean() if mask.any() else float('nan'):.4f})"
            )
    return points


def focus_classes(data: EngineData) -> tuple[int, int]:
    """Suppress the clean model's most frequent answer; boost its second most frequent."""
    counts = np.bincount(data.predictions(data.clean), minlength=data.num_classes)
    order = np.argsort(-counts, kind="stable")
    return int(order[1]), int(order[0])


def write_csv(points: list[Point], path: Path) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(point.row() for point in points)
    return path


def read_csv(path: Path) -> list[Point]:
    with open(path, newline="") as handle:
        return [
            Point(
                r["sweep"],
                float(r["strength"]),
                r["quantity"],
                float(r["measured"]),
                float(r["predicted"]) if r["predicted"] else None,
                int(r["samples"]),
                float(r["standard_error"]) if r["standard_error"] else None,
            )
            for r in csv.DictReader(handle)
        ]


def summarise(points: list[Point]) -> dict:
    """Per (sweep, quantity): max |measured - predicted|, and the largest deviation in standard errors."""
    summary = {}
    for point in points:
        if point.predicted is None or not np.isfinite(point.measured):
            continue
        key = f"{point.sweep}/{point.quantity}"
        entry = summary.setdefault(key, {"points": 0, "max_abs_diff": 0.0, "max_z": 0.0, "min_samples": None})
        diff = abs(point.measured - point.predicted)
        entry["points"] += 1
        entry["max_abs_diff"] = max(entry["max_abs_diff"], diff)
        if point.standard_error:
            entry["max_z"] = max(entry["max_z"], diff / point.standard_error)
        entry["min_samples"] = (
            point.samples if entry["min_samples"] is None else min(entry["min_samples"], point.samples)
        )
    return summary


def plot(points: list[Point], folder: Path, title: str, chance: float | None = None) -> list[Path]:
    """utility.png and focus.png: measured points over the predicted curves (chance dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    groups = {"utility": ["utility"], "focus": ["boost", "suppress"]}
    for name, sweeps in groups.items():
        panels = [s for s in sweeps if any(p.sweep == s for p in points)]
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
        for ax, sweep in zip(axes[0], panels):
            quantities = sorted({p.quantity for p in points if p.sweep == sweep})
            for index, quantity in enumerate(quantities):
                chosen = sorted(
                    (p for p in points if p.sweep == sweep and p.quantity == quantity), key=lambda p: p.strength
                )
                x = [p.strength for p in chosen]
                colour = f"C{index}"
                ax.plot(x, [p.measured for p in chosen], "o", ms=3.5, color=colour, label=f"{quantity} measured")
                if any(p.predicted is not None for p in chosen):
                    ax.plot(
                        x,
                        [np.nan if p.predicted is None else p.predicted for p in chosen],
                        "-",
                        color=colour,
                        lw=1.5,
                        label=f"{quantity} predicted",
                    )
            if sweep == "utility" and chance is not None:
                ax.axhline(chance, color="grey", ls="--", lw=1, label=f"chance 1/C = {chance:.3g}")
            ax.set_xlabel("utility sigma (logit units)" if sweep == "utility" else f"focus strength |w| ({sweep})")
            ax.set_ylabel("rate")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            ax.set_title(f"{title}: {sweep} sweep (points: engine, lines: theory)", fontsize=10)
        fig.tight_layout()
        written.append(save_figure(fig, folder / f"{name}.png"))
    return written


def evaluate(
    model: str,
    out_dir: str | os.PathLike = "build",
    checkpoint: str | os.PathLike | None = None,
    repeats: int | None = None,
    utility_grid=None,
    focus_grid=None,
    boost: int | None = None,
    suppress: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """The whole evaluation of one family; returns the summary (also written as summary.json)."""
    import onnxruntime

    from aim.evaluation.engine import eval_inputs, prepare_engine

    started = time.perf_counter()
    if repeats is not None and repeats < 1:
        raise AimError(f"--repeats must be at least 1, got {repeats}")
    onnxruntime.set_seed(seed)  # before the engine's session exists: it seeds only sessions made after it
    prepared = prepare_engine(model, out_dir, checkpoint, seed, log)
    classes = prepared.engine.num_classes
    for flag, chosen in (("boost", boost), ("suppress", suppress)):
        if chosen is not None and not 0 <= chosen < classes:  # before the sweeps, not after the first one
            raise AimError(f"--{flag} {chosen}: the model has {classes} classes (0..{classes - 1}); pick one of them")
    evaluation = prepared.evaluation
    setup = eval_inputs(prepared, seed)
    # Labels are the model's classes only for the family's own trained model (it has training.json).
    data = EngineData(prepared.engine, setup.split, setup.batch, labelled=prepared.training is not None)
    if not data.labelled:
        log("  foreign checkpoint: the data's labels are not its classes; measuring label-free quantities only")
    kind = evaluation.utility_grid
    utility_grid = UTILITY_GRID[kind] if utility_grid is None else np.asarray(utility_grid)
    focus_grid = FOCUS_GRID if focus_grid is None else np.asarray(focus_grid)
    repeats = setup.repeats if repeats is None else repeats
    clean = data.predictions(data.clean)
    log(
        f"evaluating {model}: {len(setup.split)} test inputs ({clean.size} rows), {data.num_classes} classes, "
        f"{repeats} repeat(s) per point"
    )
    if data.labelled:
        log(f"  clean engine: accuracy {metrics.accuracy(clean, data.labels):.4f}")
    points = utility_sweep(data, utility_grid, repeats, log, segmentation=evaluation.segmentation)
    default_boost, default_suppress = focus_classes(data)
    boost = default_boost if boost is None else boost
    suppress = default_suppress if suppress is None else suppress
    points += focus_sweep(data, boost, "boost", focus_grid, repeats, log)
    points += focus_sweep(data, suppress, "suppress", focus_grid, repeats, log)

    folder = Path(prepared.folder) / EVAL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(points, folder / "sweep.csv")
    plots = plot(points, folder, model, chance=1.0 / data.num_classes)
    summary = {
        "model": model,
        "checkpoint": str(prepared.checkpoint),
        "engine": str(prepared.engine.path),
        "test_inputs": len(setup.split),
        "rows": int(clean.size),
        "repeats": repeats,
        "num_classes": data.num_classes,
        "clean": {}
        if not data.labelled
        else {
            "accuracy": metrics.accuracy(clean, data.labels),
            **({"mIoU": metrics.mean_iou(clean, data.labels, data.num_classes)} if evaluation.segmentation else {}),
        },
        "training": prepared.training,
        "boost_class": boost,
        "suppress_class": suppress,
        "comparisons": summarise(points),
        "files": [str(folder / "sweep.csv"), *map(str, plots)],
        "seconds": round(time.perf_counter() - started, 1),
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def report(summary: dict) -> str:
    lines = [
        f"{summary['model']}: {summary['rows']} rows x {summary['repeats']} repeat(s), {summary['num_classes']} classes"
    ]
    lines.append("  clean: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["clean"].items()))
    for key, entry in summary["comparisons"].items():
        lines.append(
            f"  {key:28} max |measured - predicted| {entry['max_abs_diff']:.4f}  ({entry['max_z']:.1f} s.e.; "
            f">= {entry['min_samples']} samples per point)"
        )
    lines.append("  files: " + ", ".join(summary["files"]))
    return "\n".join(lines)
