"""aim verify build/MODEL: re-run a build's checks against its stored reference (no PyTorch needed)."""

from __future__ import annotations

from aim.cli import args as shared


def add(sub) -> None:
    p = sub.add_parser("verify", help="re-run a build's checks against its stored reference")
    p.add_argument("folder", help="a build folder, e.g. build/resnet")
    shared.seed(
        p, default=None, help="seed of the statistical checks (default: the build's own, which reproduces its verdicts)"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from aim.pipeline.verify import verify_folder

    manifest = verify_folder(args.folder, args.seed)
    verification = manifest.verification
    for check in verification.checks:
        print(f"{'PASS' if check.passed else 'FAIL'}  {check.name}: {check.detail}")
    if not verification.engine_run.ran:
        print(
            f"engine run SKIPPED ({manifest.engine}): {verification.engine_run.reason}; the checks ran on ONNX "
            "Runtime over the graphs it was built from"
        )
    return 0 if verification.passed else 1
