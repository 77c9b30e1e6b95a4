"""aim models: the built-in model families, and the architectures a checkpoint folder may hold, by task."""

from __future__ import annotations


def add(sub) -> None:
    sub.add_parser(
        "models", help="list the model families, and the architectures of checkpoint folders by task"
    ).set_defaults(func=run)


def run(args) -> int:
    from aim.families import get_family, list_families
    from aim.families.architectures import FIXED_IMAGE_SIZE, REFUSED, TESTED

    for name in list_families():
        family = get_family(name)
        print(f"{name:10} {family.task:22} {family.model_class}")
    print("\nCheckpoint folders (make engine CHECKPOINT=dir, no MODEL), tested architectures by task:")
    for task, names in TESTED.items():
        print(f"  {task:22} {', '.join(names)}" + (" (KV cache)" if task == "text-generation" else ""))
    print("One input size only (the checkpoint's):")
    for name, why in FIXED_IMAGE_SIZE.items():
        print(f"  {name:22} {why}")
    print("Refused:")
    for name, why in REFUSED.items():
        print(f"  {name:22} {why}")
    print("Other architectures of these tasks are tried: the build's verification against PyTorch decides.")
    return 0
