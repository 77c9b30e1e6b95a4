"""The rules that keep the package easy to live in (ARCHITECTURE.md), each held by a test:

1. imports go downward only, and no module imports itself back through others;
2. the runtime (runners, serving, the decode loop, the contract) loads no torch, transformers or
   onnx-graphsurgeon;
3. one owner per fact: nothing outside aim/families/ names a family;
4. only aim/layout.py touches manifest.json.
(5, the wheel that works alone, is tests/test_wheel.py.)
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "aim"

# The layers, bottom first: a module may import its own unit and any unit of a lower layer.
LAYERS = [
    ["aim.errors", "aim.lazy", "aim.specs", "aim.verdicts"],
    ["aim.files", "aim.contract"],
    ["aim.layout", "aim.weights"],
    ["aim.export", "aim.graph_passes"],
    ["aim.verify"],  # judges: engines and arrays in, verdicts out; no runner opened here
    ["aim.tasks"],  # what a model of a task is traced as and verified by
    ["aim.families"],  # a family inherits its task's defaults
    ["aim.runtime"],
    ["aim.generation"],  # the decode loop over any engine; opens build folders at its top (text.py)
    ["aim.pipeline"],
    ["aim.serving", "aim.evaluation", "aim.benchmarks"],
    ["aim.cli"],
]
LEVEL = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "backends" in path.parts:  # the Triton backend runs inside the server, not as part of aim
            continue
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = modules()


def unit_of(module: str) -> str | None:
    """The layer unit of a module: the longest LEVEL key that is it or a package above it."""
    candidates = [unit for unit in LEVEL if module == unit or module.startswith(unit + ".")]
    return max(candidates, key=len) if candidates else None


def imports_of(name: str, path: Path) -> set[str]:
    """Every aim module `name` imports, at the top or inside functions (a `from X import Y` of a
    submodule Y counts as importing X.Y)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return {module for module in found if module == "aim" or module.startswith("aim.")}


def test_every_module_has_a_layer():
    assert [name for name in MODULES if name != "aim" and unit_of(name) is None] == []


def test_imports_go_down_only():
    upward = []
    for name, path in MODULES.items():
        if name == "aim":
            continue
        own = unit_of(name)
        for target in imports_of(name, path):
            other = unit_of(target)
            if other is None or other == own:
                continue
            if LEVEL[other] >= LEVEL[own]:
                upward.append(f"{name} ({own}, layer {LEVEL[own]}) imports {target} ({other}, layer {LEVEL[other]})")
    assert upward == []


def test_no_import_circle():
    graph = {name: imports_of(name, path) & set(MODULES) for name, path in MODULES.items()}
    circles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                circles.append(" -> ".join(stack[stack.index(target) :] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []


def test_the_rule_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a runner importing the pipeline is an upward arrow."""
    fake = tmp_path / "runner.py"
    fake.write_text("from aim.pipeline.builder import build\n")
    assert "aim.pipeline.builder" in imports_of("aim.runtime.fake", fake)
    assert LEVEL[unit_of("aim.pipeline.builder")] > LEVEL[unit_of("aim.runtime.fake")]


# -- 2. a torch-free runtime

RUNTIME_MODULES = [
    "aim.contract",
    "aim.runtime.base",
    "aim.runtime.onnxruntime",
    "aim.runtime.tensorrt",
    "aim.runtime.folder",
    "aim.serving.triton",
    "aim.serving.config",
    "aim.serving.front",
    "aim.serving.text_front",
    "aim.serving.stub",
    "aim.serving.tiers",
    "aim.serving.textload",
    "aim.serving.server",
    "aim.serving.load_generator",
    "aim.serving.workloads",
    "aim.serving.loadtest",
    "aim.serving.loadplot",
    "aim.generation",
    "aim.generation.loop",
    "aim.generation.sampling",
    "aim.generation.limits",
    "aim.generation.text_tokenizer",
    "aim.generation.focus",
    "aim.generation.reference_runs",
    "aim.generation.text",
    "aim.cli",
    "aim.cli.run",
    "aim.cli.serve",
    "aim.cli.generate",
    "aim.cli.triton",
    "aim.cli.loadtest",
    "aim.cli.tiers",
]
HEAVY = ("torch", "transformers", "onnx_graphsurgeon")


def loaded_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sorted(m for m in sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return set(out.stdout.split())


def test_the_runtime_imports_no_torch_transformers_or_graphsurgeon():
    loaded = loaded_after(
        "\n".join(f"import {name}" for name in RUNTIME_MODULES) + "\nimport aim.cli\naim.cli.parser()"
    )
    assert sorted(m for m in HEAVY if m in loaded) == []


def test_generation_and_running_an_engine_load_no_torch(tmp_path):
    """The decode loop on a real build folder, and a runner on its engine, in a fresh process."""
    from aim.pipeline.builder import build
    from aim.pipeline.model_source import FamilySource
    from aim.pipeline.request import BuildRequest

    build(FamilySource("llama"), BuildRequest(tmp_path), log=lambda _: None)
    code = (
        "from aim.generation import generate_text\n"
        f"texts, run = generate_text({str(tmp_path / 'llama')!r}, ['def main():'], max_new_tokens=3)\n"
        "assert run.tokens.shape == (1, 3)\n"
    )
    loaded = loaded_after(code)
    assert "onnxruntime" in loaded and sorted(m for m in HEAVY if m in loaded) == []


def test_the_torch_free_check_can_fail():
    assert "torch" in loaded_after("import aim.graph_passes.redistribution as r\nr.torch.zeros(1)")


# -- 3. one owner per fact


def family_names() -> set[str]:
    from aim.families import list_families

    return set(list_families())


def literals(path: Path):
    """String constants of a module, docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_no_family_is_named_outside_its_file():
    names = family_names()
    found = [
        f"{name}:{line}: {value!r}"
        for name, path in MODULES.items()
        if not name.startswith("aim.families")
        for line, value in literals(path)
        if value in names
    ]
    assert found == []


# -- 4. only the Manifest type touches manifest.json


def test_only_layout_names_the_manifest_file():
    found = []
    for name, path in MODULES.items():
        if name == "aim.layout":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Name)
                and node.id == "MANIFEST"
                or isinstance(node, ast.alias)
                and node.name == "MANIFEST"
            ):
                found.append(f"{name}: MANIFEST")
        found += [
            f"{name}:{line}"
            for line, value in literals(path)
            if value.endswith("manifest.json") and "manifest.json" == value.split("/")[-1]
        ]
    assert found == []


@pytest.mark.parametrize("rule", [test_no_family_is_named_outside_its_file, test_only_layout_names_the_manifest_file])
def test_the_rules_catch_a_violation(rule, tmp_path, monkeypatch):
    """Each checker fails when a module breaks its rule."""
    fake = tmp_path / "fake.py"
    fake.write_text('from aim.layout import MANIFEST\nif model == "llama":\n    path = "build/manifest.json"\n')
    monkeypatch.setitem(MODULES, "aim.pipeline.fake", fake)
    with pytest.raises(AssertionError):
        rule()


def test_aim_verify_needs_no_torch_or_transformers(build_folder, keyed_build):
    """`aim verify` re-runs every check of a build (fresh noise, and keyed noise, whose PyTorch twin's
    answer the reference stores) in a process where torch and transformers cannot be imported.
    (Where torch is installed, Polygraphy's comparator imports it to ask whether an array is a torch
    tensor; it needs it no more than that.)"""
    for folder in (build_folder("llama"), keyed_build("resnet").folder):
        code = (
            "import sys\n"
            "class NotInstalled:  # torch and transformers cannot be found, as if not installed\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'transformers'):\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, NotInstalled())\n"
            f"from aim.cli import main\nassert main(['verify', {str(folder)!r}]) == 0\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert "PASS" in done.stdout and "FAIL" not in done.stdout
