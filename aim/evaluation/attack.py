"""`make attack MODEL=x`: what a client gains by sending a request K times and combining the answers,
against fresh noise and against keyed noise.

Engines: the production engine of build/<model>/ (fresh noise, built from the family's trained model
as `make eval` builds it) and a keyed production graph spliced onto the same bare graph (a fresh key,
or --noise-key FILE). sigma is where one query agrees with the clean answer half of the time:
G(sigma) = 0.5 by the theory on the clean logits. For K = 1, 2, 4, ..., 64 queries the client answers
with the argmax of the mean of the K logits ("mean"), with the most frequent of the K argmaxes ("vote";
a tie goes to the larger mean), or with the argmax of the mean of the distinct draws among the K
answers ("distinct": a client who knows the noise is keyed sets aside answers of a draw already seen,
which differ from it by far less than the noise; against fresh noise it is the mean), each scored
against the clean answer of the original request,
for (a) exact repeats and (b) repeats of imperceptible variants (TaskEvaluation.perturbation). Fresh noise
follows G(sigma / sqrt K) when averaged (drawn beside); keyed noise gains nothing from exact repeats,
and from variants only what the fresh draws they buy give (their share is measured: a variant's
noise equals the request's unless its digest moved).

Writes build/<model>/attack/attack.csv (noise, repeats, aggregate, queries, agreement, theory,
samples, standard_error), attack.png and summary.json.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from aim.contract import LOGITS
from aim.evaluation import theory
from aim.files import atomic_path, save_figure
from aim.layout import ATTACK_DIR, Manifest

QUERIES = (1, 2, 4, 8, 16, 32, 64)
TARGET = 0.5  # one query agrees with the clean answer this often
SAME_DRAW = 1e-3  # a variant's noise within this fraction of sigma of the request's: the same draw
# The "distinct" client's test: two answers are one draw if they differ by less than this fraction of
# sigma at PROBES fixed elements (two draws differ by ~1.4 sigma at each: 8 probes never all fall
# below 0.25 sigma in practice; an imperceptible variant moves the logits by ~1e-2 sigma).
DEDUPE = 0.25
PROBES = 8


@dataclass
class Point:
    noise: str  # fresh | keyed
    repeats: str  # exact | perturbed
    aggregate: str  # mean | vote | distinct
    queries: int
    agreement: float
    theory: float | None  # fresh noise, mean: G(sigma / sqrt K)
    samples: int
    standard_error: float


def _run(engine, inputs: dict, batch: int, utility: float) -> np.ndarray:
    out = []
    total = next(iter(inputs.values())).shape[0]
    for start in range(0, total, batch):
        out.append(engine.run({k: v[start : start + batch] for k, v in inputs.items()}, utility, None))
    return np.concatenate(out)


def _rows(logits: np.ndarray) -> np.ndarray:
    """[..., C, ...] with classes on axis 1 -> [rows, C]."""
    return np.moveaxis(logits, 1, -1).reshape(-1, logits.shape[1])


def keyed_engine(bare: Path, class_axis: int, key, folder: Path):
    """An ONNX Runtime engine of the keyed production graph spliced onto `bare`."""
    from aim.graph_passes.modulate import modulate_file
    from aim.runtime.onnxruntime import OnnxRuntimeEngine

    return OnnxRuntimeEngine(modulate_file(bare, folder / "modulated.keyed.onnx", LOGITS, class_axis, key=key))


def curves(engine, queries, clean_top: np.ndarray, sigma: float, batch: int) -> dict[str, dict[int, float]]:
    """{aggregate: {K: agreement}} for the first K answers to `queries` (an iterable of inputs,
    max(QUERIES) of them): "mean", "vote" and "distinct" (see the module's docstring)."""
    found = {"mean": {}, "vote": {}, "distinct": {}}
    total = votes = unique = seen = count = None
    for k, inputs in enumerate(queries, start=1):
        out = _run(engine, inputs, batch, sigma).astype(np.float64)
        rows = _rows(out)
        per_input = rows.shape[0] // out.shape[0]  # rows (pixels, positions) of one request
        flat = out.reshape(out.shape[0], -1)
        probes = flat[:, np.linspace(0, flat.shape[1] - 1, PROBES).astype(int)]
        if total is None:
            total, votes, unique = np.zeros_like(rows), np.zeros(rows.shape, np.int32), np.zeros_like(rows)
            seen, count = np.full((out.shape[0], max(QUERIES), PROBES), np.inf), np.zeros(out.shape[0], np.int64)
        total += rows
        votes[np.arange(len(rows)), rows.argmax(1)] += 1
        new = np.all(np.abs(seen - probes[:, None]).max(2) > DEDUPE * sigma, axis=1)
        seen[new, count[new]] = probes[new]
        count += new
        unique += rows * np.repeat(new, per_input)[:, None]
        if k in QUERIES:
            found["mean"][k] = float(np.mean(total.argmax(1) == clean_top))
            leading = np.where(votes == votes.max(1, keepdims=True), total, -np.inf)
            found["vote"][k] = float(np.mean(leading.argmax(1) == clean_top))
            found["distinct"][k] = float(np.mean(unique.argmax(1) == clean_top))
    return found


def fresh_draw_share(engine, variants, inputs: dict, sigma: float, batch: int) -> float:
    """The share of (variant, request) pairs whose keyed noise differs from the request's own."""
    noise = _run(engine, inputs, batch, sigma) - _run(engine, inputs, batch, 0.0)
    moved = []
    for variant in variants:
        other = _run(engine, variant, batch, sigma) - _run(engine, variant, batch, 0.0)
        moved.append(np.abs(other - noise).reshape(len(noise), -1).max(1) > SAME_DRAW * sigma)
    return float(np.mean(moved))


def attack(
    model: str,
    out_dir: str | os.PathLike = "build",
    checkpoint: str | os.PathLike | None = None,
    noise_key: str | os.PathLike | None = None,
    inputs: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """The averaging attack on one family; returns the summary (also written as summary.json)."""
    import onnxruntime

    from aim.evaluation.engine import eval_inputs, prepare_engine
    from aim.graph_passes.noise_key import NoiseKey

    started = time.perf_counter()
    key, fresh_key = NoiseKey.load_or_draw(noise_key)
    onnxruntime.set_seed(seed)  # before the engines' sessions exist: it seeds only sessions made after it
    prepared = prepare_engine(model, out_dir, checkpoint, seed, log)
    evaluation, setup = prepared.evaluation, eval_inputs(prepared, seed)
    split = setup.split if inputs is None else setup.split.take(slice(0, inputs))
    manifest = Manifest.load(prepared.folder)
    fresh = prepared.engine
    clean = _rows(_run(fresh, split.inputs, setup.batch, 0.0)).astype(np.float64)
    clean_top = clean.argmax(1)
    sigma = float(theory.invert_agreement(clean, [TARGET])[0][0])
    theory_curve = theory.agreement_curve(clean, sigma / np.sqrt(QUERIES))
    log(
        f"attack on {model}: {len(split)} inputs ({len(clean)} rows), sigma {sigma:.4g} (G = "
        f"{theory_curve[0]:.3f}), K up to {max(QUERIES)}"
    )
    log(f"  perturbed repeats: {evaluation.perturbation}")

    points: list[Point] = []
    with tempfile.TemporaryDirectory() as scratch:
        keyed = keyed_engine(manifest.graph_path("bare"), manifest.modulation.class_axis, key, Path(scratch))
        for noise, engine in (("fresh", fresh), ("keyed", keyed)):
            for repeats in ("exact", "perturbed"):
                queries = (
                    (split.inputs for _ in range(max(QUERIES)))
                    if repeats == "exact"
                    else evaluation.variants(engine, split.inputs, max(QUERIES), prepared.checkpoint, seed)
                )
                found = curves(engine, queries, clean_top, sigma, setup.batch)
                for aggregate, agreement in found.items():
                    for index, k in enumerate(QUERIES):
                        p = agreement[k]
                        expected = float(theory_curve[index]) if noise == "fresh" and aggregate == "mean" else None
                        points.append(
                            Point(
                                noise,
                                repeats,
                                aggregate,
                                k,
                                p,
                                expected,
                                len(clean),
                                float(np.sqrt(p * (1 - p) / len(clean))),
                            )
                        )
                log(
                    f"  {noise:5} {repeats:9}: K=1 {found['mean'][1]:.3f} -> K=64 mean "
                    f"{found['mean'][64]:.3f}, vote {found['vote'][64]:.3f}, distinct "
                    f"{found['distinct'][64]:.3f}"
                )
        variants = evaluation.variants(keyed, split.inputs, max(QUERIES), prepared.checkpoint, seed)
        share = fresh_draw_share(keyed, variants, split.inputs, sigma, setup.batch)
        log(f"  keyed: {share:.1%} of the perturbed repeats bought a fresh draw")
    if fresh_key and noise_key is not None:
        key.write(noise_key)

    folder = Path(prepared.folder) / ATTACK_DIR
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(points, folder / "attack.csv")
    png = plot(points, folder / "attack.png", model, sigma)
    summary = {
        "model": model,
        "checkpoint": str(prepared.checkpoint),
        "inputs": len(split),
        "rows": int(len(clean)),
        "num_classes": int(clean.shape[1]),
        "sigma": sigma,
        "agreement_one_query_theory": float(theory_curve[0]),
        "perturbation": evaluation.perturbation,
        "keyed_fresh_draw_share": share,
        "key_fingerprint": key.fingerprint,
        "queries": list(QUERIES),
        "files": [str(folder / "attack.csv"), str(png)],
        "seconds": round(time.perf_counter() - started, 1),
    }
    with atomic_path(folder / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def write_csv(points: list[Point], path: Path) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(points[0])))
        writer.writeheader()
        for point in points:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(point).items()})
    return path


def plot(points: list[Point], path: Path, title: str, sigma: float) -> Path:
    """Agreement against K, one panel per kind of repeat; the theory of averaging fresh noise dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    styles = {
        ("fresh", "mean"): "o-C0",
        ("fresh", "vote"): "s:C0",
        ("keyed", "mean"): "o-C3",
        ("keyed", "vote"): "s:C3",
        ("keyed", "distinct"): "^--C1",
    }
    for ax, repeats in zip(axes, ("exact", "perturbed")):
        for (noise, aggregate), style in styles.items():
            chosen = [p for p in points if (p.noise, p.repeats, p.aggregate) == (noise, repeats, aggregate)]
            ax.plot(
                [p.queries for p in chosen],
                [p.agreement for p in chosen],
                style,
                ms=4,
                label=f"{noise} noise, {aggregate} of K",
            )
        theory_points = [p for p in points if p.theory is not None and p.repeats == repeats]
        ax.plot(
            [p.queries for p in theory_points],
            [p.theory for p in theory_points],
            "k--",
            lw=1,
            label="theory: G(sigma / sqrt K)",
        )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("queries K")
        ax.set_title(f"{title}, sigma {sigma:.3g}: {repeats} repeats", fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("agreement with the clean answer")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def report(summary: dict, points_path: str | os.PathLike | None = None) -> str:
    lines = [
        f"{summary['model']}: {summary['rows']} rows, sigma {summary['sigma']:.4g} (one query agrees "
        f"{summary['agreement_one_query_theory']:.3f} by theory)",
        f"  perturbed repeats: {summary['perturbation']}",
        f"  keyed noise: {summary['keyed_fresh_draw_share']:.1%} of the perturbed repeats bought a fresh draw",
        "  agreement with the clean answer after K queries:",
    ]
    path = Path(points_path or summary["files"][0])
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    for noise in ("fresh", "keyed"):
        for repeats in ("exact", "perturbed"):
            for aggregate in ("mean", "vote", "distinct"):
                chosen = [r for r in rows if (r["noise"], r["repeats"], r["aggregate"]) == (noise, repeats, aggregate)]
                values = " ".join(f"{float(r['agreement']):.3f}" for r in chosen)
                lines.append(
                    f"  {noise:5} {repeats:9} {aggregate:8} K={','.join(r['queries'] for r in chosen)}: {values}"
                )
    lines.append("  files: " + ", ".join(summary["files"]))
    return "\n".join(lines)
