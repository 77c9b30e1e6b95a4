"""`make scale-check`: a real-size checkpoint through `make engine`, with the wall time and peak memory
of every step.

For each family that states a real-size config (Family.scale; the Llama family: TinyLlama-1.1B's
shape), a random-weight checkpoint is saved by `save_pretrained` in bf16 as three safetensors shards
(cached under OUT/<family>.checkpoint, as a user's checkpoint arrives), then built as `aim engine
<family> --checkpoint DIR` builds it, in a child process. The build records each step's wall time
and peak resident memory in its manifest (pipeline/memory.py); after it, the FP16 graph passes and
the Triton writer run in fresh processes on the build, each reporting the memory its work added.

    python -m aim.benchmarks.scale [--out build/scale] [--families NAME,...]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

from aim.families import get_family, list_families
from aim.files import StagedFolder, remove

SHARDS = 3
DTYPE = "bfloat16"


def make_checkpoint(name: str, folder: Path, dtype: str = DTYPE, shards: int = SHARDS, seed: int = 0) -> Path:
    """The family's real-size model with random weights, saved in `dtype` as `shards` safetensors
    shards (kept: a later run reuses it)."""
    if (folder / "config.json").is_file():
        return folder
    import torch

    family = get_family(name)
    torch.manual_seed(seed)
    model = family.model_class_object()._from_config(family.scale(), dtype=getattr(torch, dtype))
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    with StagedFolder(folder) as staged:
        # A shard closes before the tensor that would take it past the limit: a little above size /
        # shards gives `shards` files.
        model.save_pretrained(staged.path, max_shard_size=f"{math.ceil(size / shards / 1e6 * 1.02)}MB")
        staged.publish()
    return folder


# Mistral-7B's shape (v0.3: vocabulary 32768): issue 23's done-when checkpoint, `make scale-check SCALE=7b`.
MISTRAL_7B = {
    "model_type": "mistral",
    "vocab_size": 32768,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
}
SHARD_BYTES = 2_000_000_000


def write_random_checkpoint(settings: dict, folder: Path, seed: int = 0, shard_bytes: int = SHARD_BYTES) -> Path:
    """A checkpoint of the architecture `settings` describe with random bf16 weights (normal, std 0.02, as
    transformers initialises them; norms 1), written shard by shard as save_pretrained lays it out: memory
    holds one shard, never the model (a 7B model is 14.5 GB). Kept: a later run reuses it."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    import transformers
    from safetensors.torch import save_file

    config = transformers.AutoConfig.for_model(**settings)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    tensors = model.state_dict()
    shards, size = [[]], 0  # the names in each shard, planned from the shapes
    for name, meta in tensors.items():
        if shards[-1] and size + meta.numel() * 2 > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += meta.numel() * 2
    with StagedFolder(folder) as staged:
        index = {}
        for number, names in enumerate(shards, 1):
            file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            shard = {}
            for name in names:
                meta = tensors[name]
                if meta.dim() > 1:
                    value = torch.empty(meta.shape).normal_(0, 0.02, generator=generator).to(torch.bfloat16)
                else:
                    value = (torch.ones if "norm" in name else torch.zeros)(meta.shape, dtype=torch.bfloat16)
                shard[name] = value
            save_file(shard, str(staged.path / file), metadata={"format": "pt"})
            index.update(dict.fromkeys(names, file))
            del shard  # one shard in memory at a time
        total = sum(value.numel() * 2 for value in tensors.values())
        (staged.path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2) + "\n"
        )
        config.dtype = "bfloat16"
        config.save_pretrained(staged.path)
        staged.publish()
    return folder


def scaled() -> list[str]:
    return [name for name in list_families() if get_family(name).scale is not None]


def _child(code: str) -> dict:
    """Runs `code` in a fresh Python (its last stdout line is JSON), the output streamed through."""
    lines = []
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as process:
        for line in process.stdout:
            lines.append(line)
            if not line.startswith("{"):
                print("    " + line, end="", flush=True)
    if process.returncode != 0:
        raise SystemExit(f"scale-check: a step failed (exit code {process.returncode})")
    return json.loads(lines[-1])


# `aim engine NAME --checkpoint DIR --out OUT`, then what its manifest recorded.
_BUILD = """
import json, sys
from aim.cli import main
from aim.layout import Manifest
if main(["engine", {name!r}, "--checkpoint", {checkpoint!r}, "--out", {out!r}]) != 0:
    sys.exit(1)
manifest = Manifest.load({folder!r})
print(json.dumps({{
    "timings_s": manifest.timings_s, "memory_mb": manifest.memory_mb, "parameters": manifest.source.parameters,
    "dtype": manifest.source.dtype, "passed": manifest.verification.passed, "folder": str(manifest.folder),
}}))
"""

# Its peak above what the process held once the imports were done: the memory of the work itself.
_MEASURED = """
import json, time
from pathlib import Path
from aim.pipeline import memory
{imports}
step, started = memory.StepPeak(), time.perf_counter()
{work}
before, peak = step.stop()
print(json.dumps({{"seconds": time.perf_counter() - started, "grown_mb": (peak - before) / 1e6}}))
"""


# The steps of `aim engine --checkpoint DIR --precision P` up to its engine, without the verification (at
# 7B in fp16 ONNX Runtime's CPU session would upcast every weight to fp32: 29 GB), then the build
# folder's bytes against the checkpoint's and the process's own peak (VmHWM, never reset).
_STEPS = """
import json
from pathlib import Path
from aim.pipeline import builder, memory
from aim.pipeline.model_source import model_source
from aim.pipeline.progress import Progress
from aim.pipeline.request import BuildRequest
source = model_source(None, {checkpoint!r})
request = BuildRequest({out!r}, precision={precision!r}).resolve()
source.check(request, print)
folder = Path({out!r}) / source.name
folder.mkdir(parents=True, exist_ok=True)
progress = Progress(source.steps + 3, print)
prepared = source.prepare(folder, request, progress)
graphs = builder._passes(prepared, folder, request, progress)
builder._engines(graphs, prepared, folder, request, progress, print)
progress("one verification sweep: the bare graph on the reference inputs, in segments")
from aim.runtime.segments import SegmentedEngine
bare = SegmentedEngine(graphs.paths[graphs.sources["bare"]])
logits = bare.run(prepared.reference.inputs)
bare.close()
progress.done("sweep", f"{{len(bare.graph.segments)}} segments")
import numpy as np
reference = prepared.reference.logits
error = float(np.linalg.norm(logits - reference) / np.linalg.norm(reference - reference.mean(-1, keepdims=True)))
progress.close()
size = lambda where: sum(p.stat().st_size for p in Path(where).rglob("*") if p.is_file())
print(json.dumps({{
    "timings_s": progress.timings, "memory_mb": progress.memory, "parameters": prepared.record.parameters,
    "dtype": prepared.record.dtype, "passed": None, "folder": str(folder), "peak_mb": memory.peak_rss() / 1e6,
    "folder_gb": size(folder) / 1e9, "checkpoint_gb": size({checkpoint!r}) / 1e9,
    "sweep_relative_error": error, "sweep_top1_equal": bool((logits.argmax(-1) == reference.argmax(-1)).all()),
}}))
"""


def steps_7b(out: Path, precision: str = "fp16", checkpoint: Path | None = None) -> dict:
    """The Mistral-7B-shaped checkpoint (cached in OUT/mistral-7b.checkpoint, or `checkpoint`) through the
    build's steps up to its engine; returns the figures (also written to OUT/mistral-7b.scale.json)."""
    started = time.perf_counter()
    checkpoint = write_random_checkpoint(MISTRAL_7B, checkpoint or out / "mistral-7b.checkpoint")
    print(f"mistral-7b: checkpoint {checkpoint} ({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"mistral-7b: aim engine --checkpoint {checkpoint} --precision {precision}, up to the engine", flush=True)
    figures = _child(_STEPS.format(checkpoint=str(checkpoint), out=str(out), precision=precision))
    (out / "mistral-7b.scale.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def _passes_fp16(build: Path, scratch: Path) -> str:
    """The graph passes of an FP16 build (redistribution, FP16 with its weights file, TensorRT check) on
    a copy of the build's exported graph (onnx's checker refuses a data file with several hard links)."""
    remove(scratch)
    scratch.mkdir(parents=True)
    for name in ("exported.onnx", "exported.onnx.data"):
        if (build / name).is_file():
            shutil.copyfile(build / name, scratch / name)
    imports = (
        "from aim.pipeline import steps\nfrom aim.layout import Manifest\nfrom aim.tasks import "
        "get_task\nfrom aim.families import get_family\n"
        "import aim.graph_passes.fp16, aim.graph_passes.trt_support, aim.runtime.tensorrt\n"
        f"manifest = Manifest.load({str(build)!r})\nscratch = Path({str(scratch)!r})"
    )
    work = (
        "steps.passes(scratch, scratch / 'exported.onnx', 'fp16', 'onnxruntime', manifest.modulation.class_axis, "
        "manifest.modulation.upsampled_to, get_family(manifest.model).fp16_keep_fp32)"
    )
    return _MEASURED.format(imports=imports, work=work)


def _triton(build: Path, repository: Path) -> str:
    imports = "from aim.serving.triton import write_model"
    return _MEASURED.format(imports=imports, work=f"write_model({str(build)!r}, {str(repository)!r})")


def check(name: str, out: Path) -> dict:
    """Checkpoint (cached), `make engine` on it, then the FP16 passes and the Triton writer on the build;
    returns the figures (also written to OUT/<name>.scale.json)."""
    started = time.perf_counter()
    checkpoint = make_checkpoint(name, out / f"{name}.checkpoint")
    print(f"{name}: checkpoint {checkpoint} ({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"{name}: aim engine {name} --checkpoint {checkpoint} --out {out}", flush=True)
    build = _child(_BUILD.format(name=name, out=str(out), checkpoint=str(checkpoint), folder=str(out / name)))
    folder = Path(build["folder"])
    print(f"{name}: FP16 graph passes on the build's exported graph", flush=True)
    fp16 = _child(_passes_fp16(folder, out / f".{name}.fp16-passes"))
    remove(out / f".{name}.fp16-passes")
    print(f"{name}: Triton model repository from the build", flush=True)
    triton = _child(_triton(folder, out / "triton"))
    figures = {"model": name, **build, "fp16_passes": fp16, "triton_writer": triton}
    (out / f"{name}.scale.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def table(figures: dict) -> str:
    """The table of docs/results.md ("Real sizes"): wall time and resident memory of each step."""
    fp32_gb = figures["parameters"] * 4 / 1e9
    memory = figures["memory_mb"]
    rows = ["| step | wall time (s) | peak resident (GB) | added by the step (GB) |", "|---|---:|---:|---:|"]
    for step, seconds in figures["timings_s"].items():
        peak, start = memory[step]["peak"] / 1e3, memory[step]["start"] / 1e3
        rows.append(f"| {step} | {seconds:.0f} | {peak:.2f} | {peak - start:+.2f} |")
    peak = max(m["peak"] for m in memory.values()) / 1e3
    rows.append(
        f"| **make engine** | **{sum(figures['timings_s'].values()):.0f}** | **{peak:.2f}** "
        f"({peak / fp32_gb:.2f}x the {fp32_gb:.1f} GB of FP32 weights) | |"
    )
    for key, what in (
        ("fp16_passes", "FP16 graph passes + TensorRT check (fresh process)"),
        ("triton_writer", "Triton writer (fresh process)"),
    ):
        rows.append(f"| {what} | {figures[key]['seconds']:.0f} | | {figures[key]['grown_mb'] / 1e3:+.3f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aim.benchmarks.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="build/scale", type=Path)
    parser.add_argument("--families", default=",".join(scaled()), help="comma-separated families")
    parser.add_argument(
        "--size",
        choices=("family", "7b"),
        default="family",
        help="7b: a Mistral-7B-shaped bf16 checkpoint (15 GB of disk, 20 GB of memory) in fp16, up to its engine",
    )
    parser.add_argument("--checkpoint", type=Path, help="7b: the checkpoint folder (made there if missing)")
    args = parser.parse_args(argv)
    if args.size == "7b":
        figures = steps_7b(args.out, checkpoint=args.checkpoint)
        print(json.dumps(figures, indent=2))
        return 0
    for name in [n for n in args.families.split(",") if n]:
        figures = check(name, args.out)
        print(
            f"\n{name}: {figures['parameters']:,} parameters stored as {figures['dtype']}, verification "
            + ("passed" if figures["passed"] else "FAILED")
            + " (measured on this machine; other processes may share it)"
        )
        print(table(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
