"""A short human-readable summary of a build."""

from __future__ import annotations

from aim.layout import Manifest
from aim.verify.statistics import ALPHA, FALSE_FAILURE_RATE, STATISTICAL_CHECKS


def report(manifest: Manifest) -> str:
    verification = manifest.verification
    lines = [f"{manifest.model} ({manifest.task}), backend {manifest.backend}, {manifest.precision}"]
    source = manifest.source
    if source.onnx:
        lines.append(
            f"  source  {source.onnx} (sha256 {source.onnx_sha256[:16]}...), logits {manifest.modulation.logits!r}"
        )
    if manifest.modulation.noise == "keyed":
        lines.append(
            "  noise    keyed (the same request, the same answer), key fingerprint "
            f"{manifest.modulation.key_fingerprint}"
        )
    for key in ("inputs", "outputs"):
        lines.append(f"  {key:8}" + ", ".join(f"{t.name} {t.dtype} {t.dims}" for t in getattr(manifest.graph, key)))
    for build in (manifest.tensorrt or {}).values():
        lines.append(
            f"  {build['path']}: {build['bytes'] / 1e6:.1f} MB, built in {build['build_s']:.1f} s by "
            f"{build['backend']} {build['version']}"
        )
    if manifest.tensorrt:
        lines.append(
            "  profile: " + "; ".join(f"{name} {p['min']}..{p['max']}" for name, p in manifest.profile.items())
        )
    ran_on = (
        "" if verification.runner == manifest.backend else f" (on {verification.runner}: the engine cannot run here)"
    )
    lines.append(f"  checks{ran_on}:")
    for check in verification.checks:
        lines.append(f"    {'PASS' if check.passed else 'FAIL'}  {check.name}: {check.detail}")
    if any(check.name in STATISTICAL_CHECKS for check in verification.checks):
        lines.append(
            f"  statistics: each check fails below p {ALPHA:g}, so a correct engine fails them with probability <= "
            f"{FALSE_FAILURE_RATE:g}; ONNX Runtime seed {verification.seed} (aim verify reproduces them)"
        )
    tolerance, quantized = verification.tolerance, verification.quantized
    if quantized:
        lines.append(
            f"  int{quantized.bits} tolerance: relative error <= {quantized.max_relative_error:g} (or 3x the model's "
            "sensitivity, if larger), top-1 equal where "
            f"the margin > {quantized.margin_sigmas:g} sigma ({quantized.why})"
        )
        if manifest.quantization:
            done = manifest.quantization
            kept = sum(done["kept_bytes"].values())
            lines.append(
                f"  quantized: {done['matmuls']} MatMuls, {done['quantized_bytes'] / 1e6:.2f} MB of weights; "
                + (f"kept FP32: {kept / 1e6:.2f} MB (" + ", ".join(sorted(done["kept_bytes"])) + ")" if kept else "")
            )
    lines.append(
        f"  {'fp32 tolerance (keyed noise)' if quantized else 'tolerance'}: atol {tolerance.atol:g}, rtol "
        f"{tolerance.rtol:g} ({tolerance.why})"
    )
    reduced = verification.reduced_precision
    if reduced:
        lines.append(f"  fp16 comparator: {reduced.metric} (k={reduced.k}) >= {reduced.min_fraction:g} ({reduced.why})")
    files = sorted({artifact.path.split("/")[0] for artifact in manifest.artifacts.values()})
    lines.append(f"  artifacts in {manifest.folder}/: " + ", ".join([*files, manifest.file.name]))
    if not verification.engine_run.ran:
        lines.append(f"  engine run SKIPPED: {verification.engine_run.reason}")
    lines.append(
        "  verification "
        + ("PASSED" if verification.passed else "FAILED")
        + ("" if verification.engine_run.ran else " (graphs on ONNX Runtime; engine built, not run)")
    )
    return "\n".join(lines)
