"""The floors of docs/architecture.md hold at run time: no module imports a floor above its own, no import cycle, and
no command imports another. The import graph is read from the source (`import`, `from`, also inside functions, and
`importlib.import_module("name")`), with setup.py's package mapping (`pipelines/` and `model_cards/` install as
`diffscm.*`)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {  # module prefix -> floor (docs/architecture.md); the longest matching prefix wins
    "diffscm": 1,
    "diffscm.pipelines": 2,
    "diffscm.evaluation": 3,
    "diffscm.hub": 3,
    "diffscm.dataset_counterfactuals": 3,
    "diffscm.training": 4,
    "diffscm.cli": 5,
}
COMMANDS = "diffscm.cli."


def package_dirs() -> dict[str, str]:
    """setup.py's `package_dir`: {package: folder}."""
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))):
        if isinstance(node, ast.keyword) and node.arg == "package_dir":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no package_dir")


def package_modules() -> dict[str, Path]:
    """Every installed diffscm module by its import name."""
    modules = {}
    for package, folder in package_dirs().items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            modules.setdefault(".".join((package, *parts)).removesuffix(".__init__"), path)
    return modules


def imported(name: str, path: Path, known) -> set[str]:
    """The diffscm modules that module `name` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant):
                targets.add(node.args[0].value)
    return {target for target in targets if target in known and target != name}


def floor(module: str) -> int:
    return FLOORS[max((prefix for prefix in FLOORS if module == prefix or module.startswith(prefix + ".")), key=len)]


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Upward imports, imports between commands, and cycles of `graph` ({module: modules it imports})."""
    found = [
        f"{a} (floor {floor(a)}) imports {b} (floor {floor(b)})"
        for a in graph
        for b in graph[a]
        if floor(b) > floor(a)
    ]
    found += [f"command {a} imports command {b}" for a in graph for b in graph[a] if {a[:12], b[:12]} == {COMMANDS}]
    state = {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                found.append("cycle: " + " -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported(name, path, modules) for name, path in modules.items()}


def test_the_floors_hold():
    assert violations(import_graph()) == []


@pytest.mark.parametrize(
    "edges, found",
    [
        ({"diffscm.model_cards": {"diffscm.pipelines.folder"}}, "floor 1) imports diffscm.pipelines.folder"),
        ({"diffscm.pipelines.folder": {"diffscm.model_cards"}, "diffscm.model_cards": {"diffscm.pipelines.folder"}},
         "cycle: diffscm.model_cards -> diffscm.pipelines.folder -> diffscm.model_cards"),
        ({"diffscm.pipelines.pipeline_diffscm": {"diffscm.hub"}}, "imports diffscm.hub (floor 3)"),
        ({"diffscm.cli.serve": {"diffscm.cli.demo"}}, "command diffscm.cli.serve imports command diffscm.cli.demo"),
    ],
)  # fmt: skip
def test_the_floor_check_fails_on_the_imports_it_guards_against(edges, found):
    """The three upward or cyclic imports of the round-3 house issue and a command importing another are caught."""
    assert any(found in line for line in violations(edges)), violations(edges)


def test_the_graph_reader_sees_importlib_and_function_level_imports(tmp_path):
    source = "import importlib\ndef f():\n    from .hub import x\n    importlib.import_module('diffscm.training')\n"
    (tmp_path / "mod.py").write_text(source)
    known = {"diffscm.mod", "diffscm.hub", "diffscm.training"}
    assert imported("diffscm.mod", tmp_path / "mod.py", known) == {"diffscm.hub", "diffscm.training"}


NETWORKS = "diffscm.models"  # diffusers' ModelMixin subclasses: the one part of floor one that needs diffusers
FLOOR_ONE = sorted(name for name in package_modules() if floor(name) == 1 and not name.startswith(NETWORKS))


def test_floor_one_and_the_command_line_help_load_no_diffusers():
    """Every floor-one module but the networks imports without diffusers, and so do the model cards, `diffscm.hub` and
    `diffscm --help` (a command imports the evaluation when it runs)."""
    code = (
        f"import importlib, sys\nfor name in {FLOOR_ONE!r}:\n    importlib.import_module(name)\n"
        "assert 'diffusers' not in sys.modules, 'floor one loaded diffusers'\n"
        "import diffscm.hub\nfrom diffscm.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'diffusers' not in sys.modules, 'diffscm --help loaded diffusers'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_torch_free_folder_format_names_the_predictors_that_the_loader_builds():
    """`read_index` (no torch) accepts the predictor classes by name; `pipelines.folder` maps the same names."""
    from diffscm.pipelines.folder import PREDICTORS

    from diffscm.folder_format import PREDICTOR_CLASSES

    assert set(PREDICTORS) == set(PREDICTOR_CLASSES)
