"""Families state only what differs from their task, and every supported architecture has what it needs.

Optimum's rule, as its exporter tests hold it: an architecture listed as supported without a config
fails a test. Here: every task the architecture table names has a task object with every default a
record inherits, every architecture in the table gets a complete record from its config.json alone,
every task has a built-in family (`make engine MODEL=...`, `make eval`), and every built-in family is
an architecture of the table.
"""

from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path

import pytest

import aim.families
from aim.errors import UnknownModelError
from aim.families import Family, get_family, list_families
from aim.families.architectures import FIXED_IMAGE_SIZE, TESTED
from aim.families.from_checkpoint import checkpoint_family
from aim.specs import DimRange
from aim.tasks import TASKS, get_task

INHERITED = ("dims", "verify_sizes", "tolerance", "fp16", "opset")
FAMILIES_FOLDER = Path(aim.families.__file__).parent


def optimum_classes(task: str) -> dict[str, tuple[str, ...]]:
    """Optimum's own table: model_type -> the transformers classes of `task` (the independent source)."""
    from optimum.exporters.tasks import TasksManager

    mapping = TasksManager._TRANSFORMERS_TASKS_TO_MODEL_MAPPINGS[task]
    return {model_type: (names,) if isinstance(names, str) else tuple(names) for model_type, names in mapping.items()}


def test_a_family_that_states_nothing_is_its_task():
    for task in TASKS.values():
        family = Family(name="bare", task=task.name, model_class="AnyModel", tiny=None)
        assert (family.dims, family.verify_sizes) == (task.dims, task.verify_sizes)
        assert (family.tolerance, family.fp16, family.opset, family.model_type) == (
            task.tolerance,
            task.fp16,
            task.opset,
            "bare",
        )


def test_a_stated_dim_or_size_replaces_the_tasks_and_keeps_the_others():
    task = get_task("image-classification")
    family = Family(
        name="small",
        task=task.name,
        model_class="AnyModel",
        tiny=None,
        dims={"height": DimRange(16, 32, 64)},
        verify_sizes={"width": 40},
    )
    assert family.dims == {**task.dims, "height": DimRange(16, 32, 64)}
    assert family.verify_sizes == {**task.verify_sizes, "width": 40}
    assert task.dims["height"] != DimRange(16, 32, 64)  # the task's own defaults are untouched


def test_a_family_of_an_unknown_task_is_refused():
    with pytest.raises(UnknownModelError, match="unknown task 'painting'"):
        Family(name="x", task="painting", model_class="AnyModel", tiny=None)


def stated(path: Path) -> dict[str, dict]:
    """{family name: {field: value}} of the INHERITED fields each `Family(...)` call of a module states,
    evaluated in the module's own namespace."""
    module = importlib.import_module(f"aim.families.{path.stem}")
    found = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Family":
            keywords = {k.arg: k.value for k in node.keywords}
            if "name" not in keywords or not isinstance(keywords["name"], ast.Constant):
                continue  # a record built from data (a checkpoint's), not a family module's
            found[keywords["name"].value] = {
                field: eval(compile(ast.Expression(keywords[field]), str(path), "eval"), vars(module))
                for field in INHERITED
                if field in keywords
            }
    return found


def restated(name: str, fields: dict) -> list[str]:
    """The facts a family states that its task already states: a copy that would drift."""
    task = get_task(get_family(name).task)
    copies = []
    for field, value in fields.items():
        default = getattr(task, field)
        if isinstance(value, dict):
            copies += [f"{name}.{field}[{key!r}]" for key, each in value.items() if default.get(key) == each]
        elif value == default or (hasattr(value, "why") and value.why == default.why):
            copies.append(f"{name}.{field}")
    return copies


def test_no_family_restates_its_tasks_defaults():
    modules = sorted(FAMILIES_FOLDER.glob("*.py"))
    records = {name: fields for path in modules for name, fields in stated(path).items()}
    assert sorted(records) == list_families()  # every family was read
    assert [copy for name, fields in records.items() for copy in restated(name, fields)] == []


def test_the_restatement_check_catches_a_copy():
    task = get_task("text-generation")
    assert restated("llama", {"tolerance": task.tolerance, "opset": 18}) == ["llama.tolerance"]
    assert restated("resnet", {"dims": {"batch": get_task("image-classification").dims["batch"]}}) == [
        "resnet.dims['batch']"
    ]


# -- Optimum's rule: a supported architecture without what it needs fails here


def test_every_task_of_the_table_is_a_task_with_every_default():
    assert set(TESTED) <= set(TASKS)
    for name in TESTED:
        task = get_task(name)
        missing = [field for field in INHERITED if not getattr(task, field)]
        assert missing == [], f"{name} has no default {missing}: a checkpoint's record would have none"
        assert set(task.verify_sizes) <= set(task.dims), name


@pytest.mark.parametrize("task", sorted(TESTED))
def test_every_supported_architecture_gets_a_complete_record(tmp_path, task):
    """From config.json alone (model_type and the class Optimum maps it to), as `make engine
    CHECKPOINT=dir` derives it; the verification sizes lie within the dims' ranges."""
    classes = optimum_classes(task)
    for model_type in TESTED[task]:
        assert model_type in classes, f"{model_type} is listed for {task}, which Optimum does not map it to"
        folder = tmp_path / model_type
        folder.mkdir()
        config = {"model_type": model_type, "architectures": [classes[model_type][0]], "image_size": 32}
        (folder / "config.json").write_text(json.dumps(config))
        record = checkpoint_family(folder)
        assert (record.task, record.model_type, record.model_class) == (task, model_type, classes[model_type][0])
        assert all(getattr(record, field) for field in INHERITED), model_type
        assert all(record.dims[d].min <= size <= record.dims[d].max for d, size in record.verify_sizes.items())
        assert record.architecture.fixed_image_size == (model_type in FIXED_IMAGE_SIZE)


def test_every_task_has_a_family_and_every_family_is_a_supported_architecture():
    """`make engine MODEL=...`, training and evaluation need a built-in family of each task; a family's
    architecture is one the table supports, loaded by a class Optimum gives that task."""
    families = [get_family(name) for name in list_families()]
    assert {family.task for family in families} == set(TESTED)
    for family in families:
        assert family.model_type in TESTED[family.task], family.name
        assert family.model_class in optimum_classes(family.task)[family.model_type], family.name
