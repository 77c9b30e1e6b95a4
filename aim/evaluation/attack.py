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
for (a) exact repeats, (b) repeats of imperceptible variants of every kind the task has
(TaskEvaluation.perturbations: images 1, 4 and 16 intensity levels per pixel; text leading whitespace,
one word's case, a synonym) and (c) on images, variants an attacker optimised: from a random +-4 level
start, OPTIMISER_STEPS steps of signed gradient ascent on how much the keyed noise moves, through the
PyTorch model and the PyTorch twin of the keyed statement under the attacker's own key (the engine's
is secret), within +-4 levels and keeping every row's clean top-1. Fresh noise follows G(sigma / sqrt K)
when averaged (drawn beside); keyed noise gains nothing from exact repeats, and from variants only as
much as their draws differ from the request's (the mean correlation of a variant's keyed noise with the
request's is reported).

Writes build/<model>/attack/attack.csv (noise, repeats, perturbation, aggregate, queries, agreement,
theory, samples, standard_error), attack.png and summary.json (with the gain of 64 queries over one
for every noise and kind of repeat). One query's keyed agreement is a figure of one key, and inputs
that share their draw make it stray by more than its binomial error; so the engine's key and `keys` - 1
more each answer the requests once, and summary.json's `one_query_over_keys` holds their mean against
the theory with its standard error from the key-to-key spread (attack_keys.py).
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
from aim.evaluation.attack_keys import KEYS, OverKeys, measurement_keys, over_keys
from aim.files import atomic_path, save_figure
from aim.layout import ATTACK_DIR, Manifest

QUERIES = (1, 2, 4, 8, 16, 32, 64)
TARGET = 0.5  # one query agrees with the clean answer this often
OPTIMISED = "optimised-4"  # the optimising attacker's kind of repeat: within +-4 intensity levels
OPTIMISER_LEVELS = 4
OPTIMISER_STEPS = 5  # signed gradient steps of half the bound each, from a random start at the bound
OPTIMISED_WHAT = (
    f"pixels moved within +-{OPTIMISER_LEVELS} levels by {OPTIMISER_STEPS} steps of gradient ascent on the keyed "
    "noise's change (the PyTorch twin under the attacker's own key), every row's clean top-1 kept"
)
# The "distinct" client's test: two answers are one draw if they differ by less than this fraction of
# sigma at PROBES fixed elements (two draws differ by ~1.4 sigma at each: 8 probes never all fall
# below 0.25 sigma in practice; an imperceptible variant moves the logits by ~1e-2 sigma).
DEDUPE = 0.25
PROBES = 8


@dataclass
class Point:
    noise: str  # fresh | keyed
    repeats: str  # exact | perturbed | optimised
    perturbation: str  # the kind of variant ("" for exact repeats)
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


def variant_effects(engine, variants, inputs: dict, sigma: float, batch: int) -> dict[str, float]:
    """How far variants move: the median RMS move of the logits, in units of sigma, and the mean
    correlation of a variant's noise with the request's own (1: the same draw), over requests."""
    bare = _run(engine, inputs, batch, 0.0).astype(np.float64)
    noise = (_run(engine, inputs, batch, sigma) - bare).reshape(len(bare), -1)
    moves, correlations = [], []
    for variant in variants:
        logits = _run(engine, variant, batch, 0.0).astype(np.float64)
        other = (_run(engine, variant, batch, sigma) - logits).reshape(noise.shape)
        moves.append(np.sqrt(np.mean((logits - bare).reshape(len(bare), -1) ** 2, axis=1)) / sigma)
        correlations.append(np.sum(noise * other, 1) / np.sqrt(np.sum(noise**2, 1) * np.sum(other**2, 1)))
    return {"logit_move_sigmas": float(np.median(moves)), "noise_correlation": float(np.mean(correlations))}


def attacker_key(seed: int = 0):
    """The optimising attacker's own key: the engine's is secret."""
    from aim.graph_passes.noise_key import KEY_BYTES, NoiseKey

    return NoiseKey(np.random.default_rng(seed + 1).bytes(KEY_BYTES))


def optimised_variants(prepared, inputs: dict, count: int, sigma: float, seed: int = 0):
    """`count` variants of image inputs within +-OPTIMISER_LEVELS levels per pixel, each from a random
    start at the bound and OPTIMISER_STEPS signed gradient steps up the change of the keyed noise
    (logits [B, C]: the PyTorch twin under the attacker's own key) or of the pooled logits it is drawn
    from (logits with positions: the digest has no gradient), keeping every row's clean top-1 (a row
    whose top-1 a step would change keeps its previous point; segmentation: 99% of its pixels')."""
    import torch

    from aim.evaluation.task_evaluation import LEVEL, PIXELS
    from aim.graph_passes.redistribution import redistribute_torch

    evaluation = prepared.evaluation
    model = prepared.family.model_class_object().from_pretrained(str(prepared.checkpoint)).eval()
    own_key = attacker_key(seed)
    bound = OPTIMISER_LEVELS * LEVEL
    x = torch.from_numpy(np.asarray(inputs[PIXELS]))

    def logits(pixels):
        return evaluation.training_logits(model, {PIXELS: pixels})

    def drawn_from(z):  # what the keyed noise is a function of, as the attacker sees it
        if z.dim() == 2:
            utility = torch.full((z.shape[0],), sigma)
            return (redistribute_torch(z, utility, torch.zeros_like(z), key=own_key) - z) / sigma
        pooled = z.flatten(2).mean(2)
        return pooled - pooled.mean(1, keepdim=True)

    def kept(z, top):  # [B] bool: the clean top-1 kept
        same = z.argmax(1) == top
        return same if same.dim() == 1 else same.flatten(1).float().mean(1) >= 0.99

    with torch.no_grad():
        clean = logits(x)
        top, origin = clean.argmax(1), drawn_from(clean)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        delta = bound * (torch.randint(0, 2, x.shape, generator=generator, dtype=torch.float32) * 2 - 1)
        for _ in range(OPTIMISER_STEPS):
            delta.requires_grad_(True)
            moved = ((drawn_from(logits(x + delta)) - origin) ** 2).sum()
            (gradient,) = torch.autograd.grad(moved, delta)
            with torch.no_grad():
                step = torch.clamp(delta + bound / 2 * gradient.sign(), -bound, bound)
                keep = kept(logits(x + step), top).reshape((-1,) + (1,) * (x.dim() - 1))
                delta = torch.where(keep, step, delta.detach())
        yield {**inputs, PIXELS: (x + delta.detach()).numpy().astype(np.float32)}


def attack(
    model: str,
    out_dir: str | os.PathLike = "build",
    checkpoint: str | os.PathLike | None = None,
    noise_key: str | os.PathLike | None = None,
    inputs: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
    kinds: list[str] | None = None,
    keys: int = KEYS,
) -> dict:
    """The averaging attack on one family; returns the summary (also written as summary.json). `kinds`:
    the kinds of perturbed repeats to measure (default: every kind of the task, and OPTIMISED on images;
    none: exact repeats only); `keys`: the keys one query's agreement is measured under (the engine's first)."""
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

    image = "pixel_values" in split.inputs  # the optimising attacker needs pixels to move
    if kinds is None:
        kinds = list(evaluation.perturbations) + ([OPTIMISED] if image else [])
    for kind in kinds:
        if kind != OPTIMISED or not image:
            evaluation._kind(kind)  # refuses a kind the task has not
    optimise, kinds = OPTIMISED in kinds, [kind for kind in kinds if kind != OPTIMISED]
    points: list[Point] = []
    gains: dict[str, dict[str, float]] = {}
    effects: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        bare_path, class_axis = manifest.graph_path("bare"), manifest.modulation.class_axis
        keyed = keyed_engine(bare_path, class_axis, key, Path(scratch))
        runs = [("exact", "", None)] + [("perturbed", kind, kind) for kind in kinds]
        optimised = None
        if optimise:
            runs.append(("optimised", OPTIMISED, None))
        for repeats, kind, variant_kind in runs:
            for noise, engine in (("fresh", fresh), ("keyed", keyed)):
                if repeats == "exact":
                    queries = (split.inputs for _ in range(max(QUERIES)))
                elif repeats == "optimised":  # made once, for both engines: gradient steps through the model
                    if optimised is None:
                        optimised = list(optimised_variants(prepared, split.inputs, max(QUERIES), sigma, seed))
                    queries = iter(optimised)
                else:
                    queries = evaluation.variants(
                        engine, split.inputs, max(QUERIES), prepared.checkpoint, seed, kind=variant_kind
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
                                kind,
                                aggregate,
                                k,
                                p,
                                expected,
                                len(clean),
                                float(np.sqrt(p * (1 - p) / len(clean))),
                            )
                        )
                gains.setdefault(kind or "exact", {})[noise] = found["mean"][64] - found["mean"][1]
                if noise == "keyed":
                    gains[kind or "exact"]["keyed, distinct"] = found["distinct"][64] - found["distinct"][1]
                log(
                    f"  {noise:5} {repeats:9} {kind:11}: K=1 {found['mean'][1]:.3f} -> K=64 mean "
                    f"{found['mean'][64]:.3f} ({found['mean'][64] - found['mean'][1]:+.3f}), vote "
                    f"{found['vote'][64]:.3f}, distinct {found['distinct'][64]:.3f}"
                )
        for kind in kinds + ([OPTIMISED] if optimise else []):
            variants = (
                optimised[:8]
                if kind == OPTIMISED
                else evaluation.variants(keyed, split.inputs, 8, prepared.checkpoint, seed, kind=kind)
            )
            effects[kind] = variant_effects(keyed, variants, split.inputs, sigma, setup.batch)
            log(
                f"  {kind}: the logits move by {effects[kind]['logit_move_sigmas']:.4f} sigma (median RMS); the keyed "
                f"noise correlates {effects[kind]['noise_correlation']:.4f} with the request's"
            )

        def agreement_of(other) -> float:  # one query under `other`: a keyed engine of its own
            engine = (
                keyed
                if other is key
                else keyed_engine(bare_path, class_axis, other, Path(tempfile.mkdtemp(dir=scratch)))
            )
            return float(np.mean(_rows(_run(engine, split.inputs, setup.batch, sigma)).argmax(1) == clean_top))

        one_query = over_keys(agreement_of, measurement_keys(keys, key, seed), theory_curve[0], len(clean), log)
        log("  " + one_query.describe())
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
        "perturbations": {
            **{kind: evaluation.perturbations[kind] for kind in kinds},
            **({OPTIMISED: OPTIMISED_WHAT} if optimise else {}),
        },
        "gain_of_64_queries": gains,
        "one_query_over_keys": one_query.as_dict(),
        "variant_effects": effects,
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


def _panels(points: list[Point]) -> list[tuple[str, str]]:
    """(repeats, perturbation) of every kind of repeat, in the order measured."""
    seen = []
    for p in points:
        if (p.repeats, p.perturbation) not in seen:
            seen.append((p.repeats, p.perturbation))
    return seen


def plot(points: list[Point], path: Path, title: str, sigma: float) -> Path:
    """Agreement against K, one panel per kind of repeat; the theory of averaging fresh noise dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(points)
    columns = min(3, len(panels))
    rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4.2 * rows), sharey=True, squeeze=False)
    styles = {
        ("fresh", "mean"): "o-C0",
        ("fresh", "vote"): "s:C0",
        ("keyed", "mean"): "o-C3",
        ("keyed", "vote"): "s:C3",
        ("keyed", "distinct"): "^--C1",
    }
    for ax, (repeats, kind) in zip(axes.ravel(), panels):
        here = [p for p in points if (p.repeats, p.perturbation) == (repeats, kind)]
        for (noise, aggregate), style in styles.items():
            chosen = [p for p in here if (p.noise, p.aggregate) == (noise, aggregate)]
            ax.plot(
                [p.queries for p in chosen],
                [p.agreement for p in chosen],
                style,
                ms=4,
                label=f"{noise} noise, {aggregate} of K",
            )
        theory_points = [p for p in here if p.theory is not None]
        ax.plot(
            [p.queries for p in theory_points],
            [p.theory for p in theory_points],
            "k--",
            lw=1,
            label="theory: G(sigma / sqrt K)",
        )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("queries K")
        ax.set_title(f"{title}, sigma {sigma:.3g}: {repeats} {kind}".strip(), fontsize=10)
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1.02)
    for ax in axes.ravel()[len(panels) :]:
        ax.set_visible(False)
    axes[0, 0].set_ylabel("agreement with the clean answer")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def report(summary: dict, points_path: str | os.PathLike | None = None) -> str:
    lines = [
        f"{summary['model']}: {summary['rows']} rows, sigma {summary['sigma']:.4g} (one query agrees "
        f"{summary['agreement_one_query_theory']:.3f} by theory)",
        "  " + OverKeys.from_dict(summary["one_query_over_keys"]).describe(),
        "  kinds of repeat:",
        *(f"    {kind}: {what}" for kind, what in summary["perturbations"].items()),
        "  gain of 64 queries over one (mean of the answers):",
        *(
            f"    {kind:12} "
            + ", ".join(f"{noise} {gain:+.3f}" for noise, gain in by_noise.items())
            + (
                f"; logits move {summary['variant_effects'][kind]['logit_move_sigmas']:.4f} sigma, keyed noise "
                f"correlates {summary['variant_effects'][kind]['noise_correlation']:.4f} with the request's"
                if kind in summary["variant_effects"]
                else ""
            )
            for kind, by_noise in summary["gain_of_64_queries"].items()
        ),
        "  agreement with the clean answer after K queries:",
    ]
    path = Path(points_path or summary["files"][0])
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    panels = []
    for r in rows:
        if (r["repeats"], r["perturbation"]) not in panels:
            panels.append((r["repeats"], r["perturbation"]))
    for repeats, kind in panels:
        for noise in ("fresh", "keyed"):
            for aggregate in ("mean", "vote", "distinct"):
                chosen = [
                    r
                    for r in rows
                    if (r["noise"], r["repeats"], r["perturbation"], r["aggregate"])
                    == (noise, repeats, kind, aggregate)
                ]
                values = " ".join(f"{float(r['agreement']):.3f}" for r in chosen)
                label = f"{repeats} {kind}".strip()
                lines.append(
                    f"  {noise:5} {label:22} {aggregate:8} K={','.join(r['queries'] for r in chosen)}: {values}"
                )
    lines.append("  files: " + ", ".join(summary["files"]))
    return "\n".join(lines)
