"""aim modulate in.onnx -o out.onnx --logits NAME: splice the redistribution onto any model's logits."""

from __future__ import annotations

from aim.cli import args as shared


def add(sub) -> None:
    p = sub.add_parser("modulate", help="splice the redistribution subgraph onto any ONNX model's logits")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--logits", default="logits", help="name of the logits output (default: logits)")
    p.add_argument("--class-axis", type=int, default=1, help="axis of the classes in the logits (default: 1)")
    p.add_argument("--flavour", choices=("production", "verification"), default="production")
    p.add_argument("--upsample-to", help="resize the logits to this input's spatial size first (segmentation)")
    shared.noise(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from aim.graph_passes.modulate import modulate_file
    from aim.pipeline.request import noise_key_of

    key, fresh = noise_key_of(args.noise, args.noise_key)
    path = modulate_file(args.input, args.output, args.logits, args.class_axis, args.flavour, args.upsample_to, key)
    if fresh and args.noise_key:
        key.write(args.noise_key)
    print(f"wrote {args.flavour} flavour to {path}: inputs utility [B], focus [B, C] added on {args.logits!r}")
    if key is not None and args.flavour == "production":
        kept = (
            f"key saved to {args.noise_key}"
            if fresh and args.noise_key
            else f"key from {args.noise_key}"
            if args.noise_key
            else "key kept only inside the graph"
        )
        print(f"noise keyed: the same request gets the same answer; {kept}, fingerprint {key.fingerprint}")
    return 0
