"""aim models: the model families, the task each serves, and the transformers class it loads."""

from __future__ import annotations


def add(sub) -> None:
    sub.add_parser("models", help="list the model families and their tasks").set_defaults(func=run)


def run(args) -> int:
    from aim.families import get_family, list_families

    for name in list_families():
        family = get_family(name)
        print(f"{name:10} {family.task:22} {family.model_class}")
    return 0
