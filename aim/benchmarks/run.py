"""What modulation costs, each a ratio of two things measured in the same run, on the same inputs.

P1a  latency(modulated, utility 0 and focus 0 for the batch) / latency(bare)
P1b  latency(modulated, utility > 0) / latency(bare)          (also with focus on one class)
P2   cost of the subgraph over the logits tensor (utility > 0, focus on one class) / one
     RandomNormalLike over it; cost = latency(graph) - latency(the same logits, unmodulated)
     (P1a, P1b, P2 and the engine bytes also for keyed noise, beside fresh noise)
P3   throughput(engine) / throughput(PyTorch eager + torch.normal noise on the host), same batch
P4   wall time of `make engine` (python -m aim.cli engine) after set-up, cold and warm, for the family
     whose benchmark asks for it (SegFormer)
Memory: peak RSS of a process running the bare vs the modulated engine; engine bytes the subgraph adds.
Every modulated engine benchmarked here also passes the exact-identity and statistical checks.
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

from aim.benchmarks.models import BenchModel, realistic, tiny
from aim.benchmarks.timing import measure, ratio
from aim.families import get_family
from aim.verify.reference import DIFFERENTIAL_FOCUS
from aim.verify.statistics import SIGMA

THREADS = 2  # ONNX Runtime intra-op threads and torch threads: the machine's cores
STATISTICS_SEED = 0  # ONNX Runtime's seed for the statistical checks (false-failure rate: verify/statistics.py)
FOCUS_STRENGTH = DIFFERENTIAL_FOCUS  # SIGMA, the degraded tier's utility, is the statistical checks' too
TARGETS = {  # (comparison, bound); P1b's bound is the family's own (Benchmark.p1b_target)
    "P1a": ("<=", 1.02),
    "P1b": ("<=", None),
    "P1a keyed": ("<=", 1.02),
    "P1b keyed": ("<=", None),
    "P2": ("<=", 0.6),
    "P3 utility 0": (">=", 3.0),
    "P3 utility > 0": (">=", 1.5),
    "engine bytes added": ("<", 1_000_000),
    "engine bytes added (keyed)": ("<", 1_000_000),
}
# VmHWM, not getrusage: ru_maxrss survives exec, so a child would report the benchmark's own peak.
_PEAK_RSS = """
import re, sys, numpy as np, onnxruntime as ort
options = ort.SessionOptions(); options.intra_op_num_threads = int(sys.argv[3]); options.log_severity_level = 3
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
feed = dict(np.load(sys.argv[2]))
for _ in range(3):
    session.run(None, feed)
print(int(re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024)
"""


def _engine(path: Path):
    """An ONNX Runtime engine whose idle threads do not spin: variants run round-robin from several
    sessions, and a session's spinning pool would slow down whichever variant runs after it."""
    from aim.runtime.onnxruntime import OnnxRuntimeEngine

    return OnnxRuntimeEngine(path, THREADS, spinning=False)


def _judge(key: str, value: float, family: str | None = None) -> dict:
    """A figure against its target in TARGETS: {"value", "target", "met"}."""
    comparison, bound = TARGETS[key]
    bound = get_family(family).benchmark.p1b_target if bound is None else bound
    met = {"<=": value <= bound, ">=": value >= bound, "<": value < bound}[comparison]
    return {"value": value, "target": f"{comparison} {bound:g}", "met": met}


def build_engines(bench: BenchModel, folder: Path, key, log: Callable[[str], None]):
    """Model (random weights), exported ONNX, bare, modulated (production) and keyed production ONNX
    Runtime engines."""
    from aim.contract import LOGITS
    from aim.export.torch_export import random_model
    from aim.families import get_family
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


def bench_family(bench: BenchModel, folder: Path, log: Callable[[str], None] = print) -> dict:
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
    bare, modulated, keyed = _engine(paths["bare"]), _engine(paths["production"]), _engine(paths["keyed"])
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

    log(f"  {bench.family}: timing ({bench.repeats} interleaved runs per variant, after warm-up)")
    # Engine variants interleave with each other, eager PyTorch separately: torch's OpenMP threads
    # keep spinning after a call and would slow down whichever engine variant ran next.
    variants = {"bare": lambda: bare.session.run(None, inputs)}
    for label, engine in (("modulated", modulated), ("keyed", keyed)):
        variants.update(
            {
                f"{label}, utility 0": lambda engine=engine: engine.session.run(None, feeds["zero"]),
                f"{label}, utility {SIGMA:g}": lambda engine=engine: engine.session.run(None, feeds["noisy"]),
                f"{label}, utility {SIGMA:g} + focus 1 class": lambda engine=engine: engine.session.run(
                    None, feeds["focused"]
                ),
            }
        )
    times = measure(variants, repeats=bench.repeats)
    times.update(
        measure(
            {"pytorch eager": lambda: eager(False), "pytorch eager + torch.normal": lambda: eager(True)},
            repeats=bench.repeats,
        )
    )
    figures = {}
    for label, suffix in (("modulated", ""), ("keyed", " keyed")):
        figures[f"P1a{suffix}"] = ratio(times[f"{label}, utility 0"], times["bare"])
        figures[f"P1b{suffix}"] = ratio(times[f"{label}, utility {SIGMA:g}"], times["bare"])
        figures[f"P1b{suffix} with focus"] = ratio(times[f"{label}, utility {SIGMA:g} + focus 1 class"], times["bare"])
    # throughput ratio = latency(eager) / latency(engine)
    figures["P3 utility 0"] = ratio(times["pytorch eager"], times["modulated, utility 0"])
    figures["P3 utility > 0"] = ratio(times["pytorch eager + torch.normal"], times[f"modulated, utility {SIGMA:g}"])

    logits = bare.session.run(None, inputs)[0]
    tensorrt = bench_tensorrt(paths, inputs, feeds, bench.repeats, log, LOGITS)
    log(f"  {bench.family}: statistical and exact-identity checks on the benchmarked engines")
    modulated.set_seed(STATISTICS_SEED)  # a session made again after seeding: repeatable verdicts
    checks = run_statistical_checks(
        modulated, tile_batch(inputs, 2), bare.run(tile_batch(inputs, 2)), task.class_axis, STATISTICS_SEED
    )
    keyed_checks = _keyed_checks(keyed, bare, inputs, task.class_axis, key)
    memory = peak_memory(paths, feeds["noisy"], inputs, folder)
    sizes = {name: path.stat().st_size for name, path in paths.items()}
    result = {
        "model": bench.shape,
        "sizes": bench.sizes,
        "logits_shape": list(logits.shape),
        "latency": times,
        "figures": figures,
        "targets": {
            **{
                key: _judge(key, figures[key]["ratio"], bench.family)
                for key in ("P1a", "P1b", "P1a keyed", "P1b keyed", "P3 utility 0", "P3 utility > 0")
            },
            "engine bytes added": _judge("engine bytes added", sizes["production"] - sizes["bare"]),
            "engine bytes added (keyed)": _judge("engine bytes added (keyed)", sizes["keyed"] - sizes["bare"]),
        },
        "tensorrt": tensorrt,
        "checks": [check.as_dict() for check in checks],
        "checks_passed": all(check.passed for check in checks),
        "keyed_checks": [check.as_dict() for check in keyed_checks],
        "keyed_checks_passed": all(check.passed for check in keyed_checks),
        "memory": memory,
        "engine_bytes": sizes,
    }
    return result


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


def bench_tensorrt(paths: dict, inputs: dict, feeds: dict, repeats: int, log, logits: str) -> dict:
    """P1a and P1b on TensorRT where a GPU can run it (plans built for exactly these shapes)."""
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
    times = measure(
        {
            "bare": lambda: engines["bare"].infer(inputs),
            "modulated, utility 0": lambda: engines["production"].infer(feeds["zero"]),
            f"modulated, utility {SIGMA:g}": lambda: engines["production"].infer(feeds["noisy"]),
        },
        repeats=repeats,
    )
    t = list(times.values())
    return {"latency": times, "P1a": ratio(t[1], t[0]), "P1b": ratio(t[2], t[0])}


def peak_memory(paths: dict, noisy_feed: dict, inputs: dict, folder: Path) -> dict:
    """Peak RSS of a fresh process that loads the engine and runs it three times."""
    np.savez(folder / "feed.bare.npz", **inputs)
    np.savez(folder / "feed.noisy.npz", **noisy_feed)
    peaks = {}
    for key, feed in (("bare", "feed.bare.npz"), ("production", "feed.noisy.npz")):
        out = subprocess.run(
            [sys.executable, "-c", _PEAK_RSS, str(paths[key]), str(folder / feed), str(THREADS)],
            check=True,
            capture_output=True,
            text=True,
        )
        peaks[key] = int(out.stdout.strip().splitlines()[-1])
    return {"peak_rss_bytes": peaks, "ratio": peaks["production"] / peaks["bare"]}


def bench_noise(shape: list[int], class_axis: int, folder: Path, repeats: int) -> dict:
    """P2 on the logits tensor alone: the subgraph (utility > 0, focus on one class) vs one
    RandomNormalLike, each net of the unmodulated graph (the same tensor in, the same tensor out)."""
    import onnx
    from onnx import TensorProto, helper

    from aim.contract import BATCH, FOCUS, NOISE_METHODS, UTILITY
    from aim.graph_passes.io import load_graph, save_onnx
    from aim.graph_passes.noise_key import NoiseKey
    from aim.graph_passes.redistribution import add_redistribution

    folder.mkdir(parents=True, exist_ok=True)
    dims = [BATCH, *shape[1:]]

    def single(op: str, path: Path, **attrs) -> Path:
        graph = helper.make_graph(
            [helper.make_node(op, ["z"], ["logits"], **attrs)],
            op,
            [helper.make_tensor_value_info("z", TensorProto.FLOAT, dims)],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, dims)],
        )
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        return path

    identity = single("Identity", folder / "identity.onnx")
    normal = single("RandomNormalLike", folder / "random_normal_like.onnx", dtype=TensorProto.FLOAT)
    paths = {"unmodulated": identity, "RandomNormalLike": normal}
    sources = {method: {"noise": method} for method in NOISE_METHODS}
    sources["keyed"] = {"key": NoiseKey.draw()}
    for method, how in sources.items():
        graph = add_redistribution(load_graph(identity), "logits", class_axis, **how)
        paths[f"subgraph ({method})"] = save_onnx(graph, folder / f"identity.{method}.onnx")
    sessions = {name: _engine(path).session for name, path in paths.items()}
    z = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    focus = np.zeros([shape[0], shape[class_axis]], np.float32)
    focus[:, 1] = FOCUS_STRENGTH
    feeds = {name: {"z": z} for name in paths}
    for method in sources:
        feeds[f"subgraph ({method})"] = {"z": z, UTILITY: np.full([shape[0]], SIGMA, np.float32), FOCUS: focus}
    times = measure(
        {name: (lambda name=name: sessions[name].run(None, feeds[name])) for name in paths}, repeats=repeats
    )
    result = {"shape": shape, "latency": times}
    for method in sources:
        cost = times[f"subgraph ({method})"]["median_ms"] - times["unmodulated"]["median_ms"]
        value = cost / times["RandomNormalLike"]["median_ms"]
        result[f"P2 ({method})"] = {**_judge("P2", value), "cost_ms": cost}
    return result


def bench_make_engine(family: str, log: Callable[[str], None]) -> dict:
    """P4: `python -m cli engine` (what `make engine` runs once .venv exists), cold then warm."""
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


def run(models: list[str], out: Path, quick: bool = False, make_engine: bool = True, log=print) -> dict:
    """Benchmarks `models` (realistic sizes, or tiny ones with `quick`) and writes the JSON into `out`."""
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
            "provider": "CPUExecutionProvider",
        },
        "utility": SIGMA,
        "focus_strength": FOCUS_STRENGTH,
        "families": {},
        "noise": {},
    }
    for name in models:
        bench = tiny(name) if quick else realistic(name)
        log(f"[{name}] {bench.shape}")
        with tempfile.TemporaryDirectory(dir=out) as work:
            result = bench_family(bench, Path(work), log)
            results["families"][name] = result
            shape = result["logits_shape"]
            big = int(np.prod(shape)) > 1_000_000
            log(f"  {name}: P2 over a logits tensor of shape {shape}")
            results["noise"][name] = bench_noise(
                shape, _class_axis(name), Path(work) / "noise", bench.repeats if big else 50
            )
    timed = [name for name in models if get_family(name).benchmark.time_make_engine]
    if make_engine and not quick and timed:
        results["P4"] = bench_make_engine(timed[0], log)
    path = out / ("bench.quick.json" if quick else "bench.json")
    path.write_text(json.dumps(results, indent=2))
    log(table(results))
    log(f"written: {path}")
    return results


def _class_axis(family: str) -> int:
    from aim.tasks import get_task

    return get_task(get_family(family).task).class_axis


def table(results: dict) -> str:
    """The figures as a plain-text table: value, spread, target, met."""
    rows = [("figure", "model", "value", "spread (q1..q3)", "target", "met")]
    for name, result in results["families"].items():
        for key, target in result["targets"].items():
            spread = result["figures"].get(key)
            value = target["value"]
            shown = f"{value:.3f}" if not key.startswith("engine bytes added") else f"{value / 1024:.1f} KiB"
            rows.append(
                (
                    key,
                    name,
                    shown,
                    f"{spread['low']:.3f}..{spread['high']:.3f}" if spread else "",
                    target["target"],
                    "yes" if target["met"] else "NO",
                )
            )
        for key in ("P1b with focus", "P1b keyed with focus"):
            extra = result["figures"][key]
            rows.append((key, name, f"{extra['ratio']:.3f}", f"{extra['low']:.3f}..{extra['high']:.3f}", "", ""))
        rows.append(("peak RSS ratio", name, f"{result['memory']['ratio']:.3f}", "", "", ""))
        for key, label in (("checks_passed", "checks"), ("keyed_checks_passed", "keyed checks")):
            rows.append(
                (label, name, "passed" if result[key] else "FAILED", "", "all pass", "yes" if result[key] else "NO")
            )
    for name, noise in results["noise"].items():
        for key, p2 in noise.items():
            if key.startswith("P2"):
                rows.append(
                    (
                        key,
                        f"{name} {noise['shape']}",
                        f"{p2['value']:.3f}",
                        "",
                        p2["target"],
                        "yes" if p2["met"] else "NO",
                    )
                )
    if "P4" in results:
        walls = results["P4"]["wall_s"]
        rows.append(
            (
                "P4 make engine",
                results["P4"]["model"],
                f"cold {walls['cold']:.1f} s, warm {walls['warm']:.1f} s",
                "",
                "",
                "",
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in rows)
