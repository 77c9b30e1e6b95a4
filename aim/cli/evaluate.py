"""aim eval MODEL and aim calibrate MODEL: the engine against the theory, and the level -> sigma table."""

from __future__ import annotations

from aim.cli import args as shared


def _common(p) -> None:
    p.add_argument("model")
    p.add_argument("--checkpoint", help="a save_pretrained folder (default: the family's trained model, trained if needed)")
    shared.out(p)
    shared.seed(p)


def add(sub) -> None:
    p = sub.add_parser("eval", help="utility and focus sweeps through the engine, measured vs predicted (CSV, plots)")
    _common(p)
    p.add_argument("--repeats", type=shared.positive_int, help="engine runs per sweep point (default: per family)")
    p.add_argument("--boost", type=shared.non_negative_int, help="class to boost (default: the clean model's 2nd most frequent answer)")
    p.add_argument("--suppress", type=shared.non_negative_int, help="class to suppress (default: its most frequent answer)")
    p.set_defaults(func=run_eval)
    p = sub.add_parser("calibrate", help="invert G on calibration inputs: level -> sigma, and an engine taking utility_level")
    _common(p)
    p.set_defaults(func=run_calibrate)


def run_eval(args) -> int:
    from aim.evaluation.sweep import evaluate, report

    print(report(evaluate(args.model, args.out, args.checkpoint, args.repeats, boost=args.boost, suppress=args.suppress, seed=args.seed)))
    return 0


def run_calibrate(args) -> int:
    from aim.evaluation.calibrate import calibrate, report

    print(report(calibrate(args.model, args.out, args.checkpoint, seed=args.seed)))
    return 0
