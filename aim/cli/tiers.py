"""aim tiers key TIER --tiers tiers.json: a new key of a tier (its digest added to the file, the key
printed once); aim tiers show --tiers tiers.json: the table, without keys."""

from __future__ import annotations


def add(sub) -> None:
    p = sub.add_parser("tiers", help="the owner's tier table: make keys, show the tiers")
    commands = p.add_subparsers(dest="tiers_command", required=True)
    key = commands.add_parser(
        "key",
        help="make a random key of TIER: its SHA-256 goes into the tiers file, the key is printed once (last line)",
    )
    key.add_argument("tier", help="a tier of the file, e.g. premium")
    key.add_argument("--tiers", required=True, help="the tiers file (JSON), e.g. tiers.json")
    key.set_defaults(func=run_key)
    show = commands.add_parser("show", help="the tiers, the default and how many keys each tier has")
    show.add_argument("--tiers", required=True, help="the tiers file (JSON)")
    show.set_defaults(func=run_show)


def run_key(args) -> int:
    from aim.serving.tiers import add_key

    key = add_key(args.tiers, args.tier)
    print(
        f"added a key of tier {args.tier!r} to {args.tiers} (its SHA-256; the key itself is kept nowhere). It is "
        "shown once, below: give it to its holder, who sends `Authorization: Bearer KEY`. Re-run `aim triton "
        "--tiers` and reload the model for the server to know it."
    )
    print(key, flush=True)
    return 0


def run_show(args) -> int:
    from collections import Counter

    from aim.serving.tiers import TierTable

    table = TierTable.load(args.tiers)
    keys = Counter(table.keys.values())
    for name, tier in table.tiers.items():
        knob = f"utility {tier.utility:g}" if tier.level is None else f"level {tier.level:g}"
        default = "  (default: no key, or an unknown one)" if name == table.default else ""
        print(f"{name:16} {knob:16} {keys[name]} key{'s' if keys[name] != 1 else ''}{default}")
    return 0
