"""What modulation costs, each figure a ratio of two things measured in the same rounds, on the same inputs.

Per family (names as in figures.py, bench.json and the table):
- latency at utility 0 / bare: the modulated engine with utility 0 and focus 0 for the whole batch;
- latency with noise / bare: utility > 0 (also with focus on one class, and each for keyed noise);
- engine speed-up over eager PyTorch (+ torch.normal on the host for the noisy tier), same batch;
- subgraph cost / one RandomNormalLike: the subgraph (utility > 0, focus on one class) on the logits
  tensor alone, net of an identity graph, over one RandomNormalLike over it;
- engine bytes the subgraph adds; peak RSS of a process running the modulated engine over the bare one
  (memory.py: the engine as shipped over the bare model as a user runs it, and as shipped both);
- for engines shipped with other session options than ONNX Runtime's default (maps: no memory
  pattern), the bare engine's latency as shipped over in the default session: what those options cost;
- make engine wall time (python -m aim.cli engine) after set-up, cold and warm, for the family whose
  benchmark asks for it (SegFormer).
Generation against Optimum and transformers: generation.py. Every ratio carries a 95% interval and
a verdict (confidence.py). Every modulated engine benchmarked here also passes the exact-identity
and statistical checks.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from aim.benchmarks import figures as names
from aim.benchmarks.confidence import BUDGET, MET, MISSED, Budget, Figure, Target, ratio, resolve
from aim.benchmarks.memory import peak_memory
from aim.benchmarks.models import BenchModel, realistic, tiny
from aim.benchmarks.table import table
from aim.benchmarks.timing import THREADS, Rounds, quiet_engine
from aim.families import get_family
from aim.verify.reference import DIFFERENTIAL_FOCUS
from aim.verify.statistics import SIGMA

DEFAULT_BARE = "bare, ONNX Runtime's default session"
STATISTICS_SEED = 0  # ONNX Runtime's seed for the statistical checks (false-failure rate: verify/statistics.py)
FOCUS_STRENGTH = DIFFERENTIAL_FOCUS  # SIGMA, the degraded tier's utility, is the statistical checks' too


def single(value: float, target: Target) -> dict:
    """A figure measured once (bytes, a peak): no interval, a verdict from the value itself."""
    met = value <= target.bound if target.comparison == "<=" else value >= target.bound
    return {
        "value": value,
        "low": value,
        "high": value,
        "pairs": 1,
        "target": str(target),
        "verdict": MET if met else MISSED,
    }


def build_engines(bench: BenchModel, folder: Path, key, log: Callable[[str], None]):
    """Model (random weights), exported ONNX, bare, modulated (production) and keyed production ONNX
    Runtime engines."""
    from aim.contract import LOGITS
    from aim.export.torch_export import random_model
    from aim.graph_passes.io import load_onnx, save_onnx
    from aim.graph_passes.modulate import deployment_graphs
    from aim.graph_passes.redistribution import add_redistribution
    from aim.pipeline import steps
    from aim.runtime import onnxruntime as ort_engine
    from aim.tasks import get_task

    family = get_family(bench.family)
    task = get_task(family.task)
    model = random_model(bench.build, seed=0)
    log(
        f"  {bench.family}: {bench.shape}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
        "parameters; exporting"
    )
    exported = steps.export(family, task, model, folder / "exported.onnx")
    graphs = deployment_graphs(load_onnx(exported), LOGITS, task.class_axis, task.upsample_logits_to)
    graphs["keyed"] = add_redistribution(graphs["bare"].copy(), LOGITS, task.class_axis, key=key)
    paths = {}
    for name in ("bare", "production", "keyed"):
        source = save_onnx(graphs[name], folder / f"{name}.onnx")
        paths[name] = ort_engine.build(source, folder / f"{name}.engine.onnx", threads=THREADS)
    return task, model, paths


def latency_figures(family: str) -> list[Figure]:
    """The family's latency ratios and speed-ups over the variants of bench_family, per round."""
    figures = []
    for label, suffix in (("modulated", ""), ("keyed", names.KEYED)):
        figures += [
            Figure(names.UTILITY_0 + suffix, ratio(f"{label}, utility 0", "bare"), names.TARGETS[names.UTILITY_0]),
            Figure(names.NOISE + suffix, ratio(f"{label}, utility {SIGMA:g}", "bare"), names.noise_target(family)),
            Figure(names.NOISE_FOCUS + suffix, ratio(f"{label}, utility {SIGMA:g} + focus 1 class", "bare")),
        ]
    return figures + [
        Figure(names.SPEEDUP_0, ratio("pytorch eager", "modulated, utility 0"), names.TARGETS[names.SPEEDUP_0]),
        Figure(
            names.SPEEDUP_NOISE,
            ratio("pytorch eager + torch.normal", f"modulated, utility {SIGMA:g}"),
            names.TARGETS[names.SPEEDUP_NOISE],
        ),
    ]


def bench_family(bench: BenchModel, folder: Path, log: Callable[[str], None] = print, budget: Budget = BUDGET) -> dict:
    import torch

    from aim.contract import FOCUS, LOGITS, UTILITY, check_modulation
    from aim.graph_passes.noise_key import NoiseKey
    from aim.pipeline.engine_runs import run_statistical_checks
    from aim.verify.reference import tile_batch

    folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(THREADS)
    key = NoiseKey.draw()
    task, model, paths = build_engines(bench, folder, key, log)
    inputs_t = task.example_inputs(model, bench.sizes)
    inputs = {name: tensor.numpy() for name, tensor in inputs_t.items()}
    bare, modulated, keyed = (
        quiet_engine(paths["bare"]),
        quiet_engine(paths["production"]),
        quiet_engine(paths["keyed"]),
    )
    batch, classes = next(iter(inputs.values())).shape[0], modulated.num_classes

    def feed(utility, focus=None):
        u, f = check_modulation(utility, focus, batch, classes)
        return {**inputs, UTILITY: u, FOCUS: f}

    one_class = np.zeros(classes, np.float32)
    one_class[1 % classes] = FOCUS_STRENGTH
    feeds = {"zero": feed(0.0), "noisy": feed(SIGMA), "focused": feed(SIGMA, one_class)}

    def eager(noise: bool):
        with torch.no_grad():
            logits = task.reference_logits(model, inputs_t)
            if noise:  # the reference code: host noise from torch.normal on the (upsampled) logits
                logits = logits + torch.normal(0.0, SIGMA, size=logits.shape)
        return logits

    # One round runs every variant once; eager PyTorch's runs are followed by a pause (timing.SETTLE_S).
    variants = {"bare": lambda: bare.session.run(None, inputs)}
    figures = latency_figures(bench.family)
    if not bare.session.get_session_options().enable_mem_pattern:  # shipped options that differ: their cost
        default = quiet_engine(paths["bare"], memory_pattern=True)
        variants[DEFAULT_BARE] = lambda: default.session.run(None, inputs)
        figures.append(Figure(names.SESSION_COST, ratio("bare", DEFAULT_BARE)))
    for label, engine in (("modulated", modulated), ("keyed", keyed)):
        for name, tier in (
            ("utility 0", "zero"),
            (f"utility {SIGMA:g}", "noisy"),
            (f"utility {SIGMA:g} + focus 1 class", "focused"),
        ):
            variants[f"{label}, {name}"] = lambda engine=engine, tier=tier: engine.session.run(None, feeds[tier])
    variants["pytorch eager"] = lambda: eager(False)
    variants["pytorch eager + torch.normal"] = lambda: eager(True)
    log(
        f"  {bench.family}: timing ({bench.repeats} interleaved rounds after warm-up; more while a target is "
        "unresolved)"
    )
    rounds = Rounds(variants, settle=("pytorch eager", "pytorch eager + torch.normal"))
    timing = resolve(rounds, figures, bench.repeats, budget, log=log)

    logits = bare.session.run(None, inputs)[0]
    tensorrt = bench_tensorrt(paths, inputs, feeds, bench.repeats, log, LOGITS, budget)
    log(f"  {bench.family}: statistical and exact-identity checks on the benchmarked engines")
    modulated.set_seed(STATISTICS_SEED)  # a session made again after seeding: repeatable verdicts
    checks = run_statistical_checks(
        modulated, tile_batch(inputs, 2), bare.run(tile_batch(inputs, 2)), task.class_axis, STATISTICS_SEED
    )
    keyed_checks = _keyed_checks(keyed, bare, inputs, task.class_axis, key)
    log(f"  {bench.family}: peak memory (a fresh process per engine and session, {bench.memory_rounds} rounds)")
    memory = peak_memory(paths, feeds["noisy"], inputs, folder, bench.memory_rounds, budget)
    sizes = {name: path.stat().st_size for name, path in paths.items()}
    bytes_target = names.TARGETS[names.ENGINE_BYTES]
    figures = {
        **timing["figures"],
        names.ENGINE_BYTES: single(sizes["production"] - sizes["bare"], bytes_target),
        names.ENGINE_BYTES + names.KEYED: single(sizes["keyed"] - sizes["bare"], bytes_target),
        **memory["figures"],
    }
    return {
        "model": bench.shape,
        "sizes": bench.sizes,
        "logits_shape": list(logits.shape),
        "figures": figures,
        "timing": {k: v for k, v in timing.items() if k != "figures"},
        "tensorrt": tensorrt,
        "checks": [check.as_dict() for check in checks],
        "checks_passed": all(check.passed for check in checks),
        "keyed_checks": [check.as_dict() for check in keyed_checks],
        "keyed_checks_passed": all(check.passed for check in keyed_checks),
        "memory": memory,
        "engine_bytes": sizes,
    }


def _keyed_checks(keyed, bare, inputs: dict, class_axis: int, key) -> list:
    """The keyed checks of `make engine NOISE=keyed` on the benchmarked keyed engine, against the
    PyTorch twin on the bare engine's logits."""
    from aim.pipeline.engine_runs import run_keyed_checks
    from aim.verdicts import Tolerance
    from aim.verify.reference import Reference, differential_knobs, keyed_expectation, tile_batch

    logits = bare.run(inputs)
    knobs = differential_knobs(logits.shape[0], logits.shape[class_axis], logits.shape, 0)
    reference = Reference(inputs=inputs, logits=logits, modulated=logits, **knobs)
    reference.keyed_modulated = keyed_expectation(logits, reference, class_axis, key)
    tolerance = Tolerance(1e-4, 1e-4, "fp32: the same statement, kernels that differ in the last bits")
    # Two rows where the logits are small; a 39 M-logit segmentation map alone (the keyed engine's
    # int64 intermediates are 8 bytes per logit: gigabytes for two rows).
    stats_inputs = tile_batch(inputs, 2) if logits.size < 10_000_000 else inputs
    return run_keyed_checks(keyed, stats_inputs, bare.run(stats_inputs), class_axis, reference, tolerance)


def bench_tensorrt(paths: dict, inputs: dict, feeds: dict, repeats: int, log, logits: str, budget: Budget) -> dict:
    """Latency at utility 0 and with noise over bare on TensorRT, where a GPU can run it (plans built
    for exactly these shapes)."""
    from aim.runtime.tensorrt import TensorRTEngine, build_engine, engine_runnable

    runnable, why = engine_runnable("tensorrt")
    if not runnable:
        log(f"  TensorRT: skipped ({why})")
        return {"skipped": why}
    engines = {}
    for key, feed in (("bare", inputs), ("production", feeds["zero"])):
        profile = {name: {"min": list(a.shape), "opt": list(a.shape), "max": list(a.shape)} for name, a in feed.items()}
        onnx_path = paths[key].with_name(f"{key}.onnx")
        plan = build_engine(onnx_path, onnx_path.with_suffix(".plan"), "tensorrt", profile).path
        io = {name: (a.dtype.type, list(a.shape)) for name, a in feed.items()}
        engines[key] = TensorRTEngine(plan, "tensorrt", io, [logits], profile)
    rounds = Rounds(
        {
            "bare": lambda: engines["bare"].infer(inputs),
            "modulated, utility 0": lambda: engines["production"].infer(feeds["zero"]),
            f"modulated, utility {SIGMA:g}": lambda: engines["production"].infer(feeds["noisy"]),
        }
    )
    figures = [
        Figure(names.UTILITY_0, ratio("modulated, utility 0", "bare"), names.TARGETS[names.UTILITY_0]),
        Figure(names.NOISE, ratio(f"modulated, utility {SIGMA:g}", "bare")),
    ]
    return resolve(rounds, figures, repeats, budget)


def bench_noise(shape: list[int], class_axis: int, folder: Path, repeats: int, budget: Budget = BUDGET) -> dict:
    """Subgraph cost / one RandomNormalLike on the logits tensor alone: the subgraph (utility > 0,
    focus on one class) vs one RandomNormalLike, each net of the unmodulated graph (the same tensor
    in, the same tensor out), round by round."""
    import onnx
    from onnx import TensorProto, helper

    from aim.contract import BATCH, FOCUS, NOISE_METHODS, UTILITY
    from aim.graph_passes.io import load_graph, save_onnx
    from aim.graph_passes.noise_key import NoiseKey
    from aim.graph_passes.redistribution import add_redistribution

    folder.mkdir(parents=True, exist_ok=True)
    dims = [BATCH, *shape[1:]]

    def one_node(op: str, path: Path, **attrs) -> Path:
        graph = helper.make_graph(
            [helper.make_node(op, ["z"], ["logits"], **attrs)],
            op,
            [helper.make_tensor_value_info("z", TensorProto.FLOAT, dims)],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, dims)],
        )
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        return path

    identity = one_node("Identity", folder / "identity.onnx")
    normal = one_node("RandomNormalLike", folder / "random_normal_like.onnx", dtype=TensorProto.FLOAT)
    paths = {"unmodulated": identity, "RandomNormalLike": normal}
    sources = {method: {"noise": method} for method in NOISE_METHODS}
    sources["keyed"] = {"key": NoiseKey.draw()}
    for method, how in sources.items():
        graph = add_redistribution(load_graph(identity), "logits", class_axis, **how)
        paths[f"subgraph ({method})"] = save_onnx(graph, folder / f"identity.{method}.onnx")
    sessions = {name: quiet_engine(path).session for name, path in paths.items()}
    z = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    focus = np.zeros([shape[0], shape[class_axis]], np.float32)
    focus[:, 1] = FOCUS_STRENGTH
    feeds = {name: {"z": z} for name in paths}
    for method in sources:
        feeds[f"subgraph ({method})"] = {"z": z, UTILITY: np.full([shape[0]], SIGMA, np.float32), FOCUS: focus}
    rounds = Rounds({name: (lambda name=name: sessions[name].run(None, feeds[name])) for name in paths})

    def cost(method: str):
        subgraph = f"subgraph ({method})"
        return lambda t: (t[subgraph] - t["unmodulated"]) / t["RandomNormalLike"]

    figures = [
        Figure(f"{names.SUBGRAPH} ({method})", cost(method), names.TARGETS[names.SUBGRAPH]) for method in sources
    ]
    return {"shape": shape, **resolve(rounds, figures, repeats, budget)}


def bench_make_engine(family: str, log: Callable[[str], None]) -> dict:
    """`python -m aim.cli engine` (what `make engine` runs once .venv exists), cold then warm."""
    walls = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label in ("cold", "warm"):
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "aim.cli", "engine", family, "--out", tmp], check=True, capture_output=True
            )
            walls[label] = time.perf_counter() - start
            log(f"  make engine MODEL={family}: {label} {walls[label]:.1f} s")
    return {"model": family, "wall_s": walls}


def run(
    models: list[str],
    out: Path,
    quick: bool = False,
    make_engine: bool = True,
    generation: bool = True,
    budget: Budget = BUDGET,
    log=print,
) -> dict:
    """Benchmarks `models` (realistic sizes, or tiny ones with `quick`) and, with `generation`, decoding
    against Optimum and transformers; writes the JSON into `out`."""
    import os

    import onnxruntime

    out.mkdir(parents=True, exist_ok=True)
    results = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "onnxruntime": {
            "version": onnxruntime.__version__,
            "intra_op_num_threads": THREADS,
            "execution_mode": "sequential",
            "allow_spinning": False,
            "graph_optimization": "engine saved at ORT_ENABLE_EXTENDED, loaded with ORT_ENABLE_ALL",
            "memory_pattern": (
                "off for engines whose output is a map (rank >= 4, not a KV cache), else ONNX Runtime's default (on)"
            ),
            "provider": "CPUExecutionProvider",
        },
        "utility": SIGMA,
        "focus_strength": FOCUS_STRENGTH,
        "intervals": {"confidence": budget_level_note(budget), "budget": str(budget)},
        "families": {},
        "noise": {},
    }
    for name in models:
        bench = tiny(name) if quick else realistic(name)
        log(f"[{name}] {bench.shape}")
        with tempfile.TemporaryDirectory(dir=out) as work:
            result = bench_family(bench, Path(work), log, budget)
            results["families"][name] = result
            shape = result["logits_shape"]
            big = int(np.prod(shape)) > 1_000_000
            log(f"  {name}: subgraph cost over a logits tensor of shape {shape}")
            results["noise"][name] = bench_noise(
                shape, _class_axis(name), Path(work) / "noise", bench.repeats if big else 50, budget
            )
    if generation:
        from aim.benchmarks.generation import bench_generation

        results["generation"] = bench_generation(out / "generation", quick, log, budget)
    timed = [name for name in models if get_family(name).benchmark.time_make_engine]
    if make_engine and not quick and timed:
        results[names.MAKE_ENGINE] = bench_make_engine(timed[0], log)
    path = out / ("bench.quick.json" if quick else "bench.json")
    path.write_text(json.dumps(results, indent=2))
    log(table(results))
    log(f"written: {path}")
    return results


def budget_level_note(budget: Budget) -> str:
    return (
        f"95% over all looks: median of paired per-round values, distribution-free interval at {budget.level:.2%} "
        f"per look ({len(budget.looks)} looks)"
    )


def _class_axis(family: str) -> int:
    from aim.tasks import get_task

    return get_task(get_family(family).task).class_axis
