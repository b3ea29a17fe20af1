"""The package's shape: folders follow the data flow, no import cycles, small modules and
functions. Read from the source (every import counts, lazy ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lrcompile"
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 60
KERNELS = {"lrcompile.plugins.kernel"}  # Triton kernels: one function per GPU program

# The data flow, bottom up: a module may import its own layer and the layers below, never above.
LAYERS = [
    {
        "lrcompile.errors",
        "lrcompile.report",
        "lrcompile.numerics",
        "lrcompile.plan",
        "lrcompile.profile",
    },
    {"lrcompile.io", "lrcompile.runtime"},
    {"lrcompile.passes"},
    {"lrcompile.config", "lrcompile.pipeline", "lrcompile.factors"},
    {"lrcompile.calibration"},
    {"lrcompile.search"},
    {"lrcompile.check", "lrcompile.trt", "lrcompile.plugins"},
    {
        "lrcompile.stages",
        "lrcompile.compiler",
        "lrcompile.sweep",
        "lrcompile.inspection",
        "lrcompile",
    },
    {"lrcompile.cli", "lrcompile.demo", "lrcompile.tools", "lrcompile.__main__"},
]


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """Every module ``name`` imports, at any depth of its code: lrcompile modules by name (a
    ``from lrcompile.x import y`` of a module ``y`` counts as ``lrcompile.x.y``), others by
    their top-level package."""
    tree = ast.parse(MODULES[name].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in MODULES else node.module)
    return {m if m.startswith("lrcompile") else m.split(".")[0] for m in found}


def _layer(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        for prefix in layer:
            inside = module == prefix or module.startswith(prefix + ".")
            if inside and (prefix != "lrcompile" or module == "lrcompile"):
                return index
    raise AssertionError(f"{module} belongs to no layer of the data flow")


def test_every_module_belongs_to_a_layer():
    for name in MODULES:
        _layer(name)


def test_no_module_imports_a_later_stage():
    wrong = [
        f"{name} -> {imported}"
        for name in MODULES
        for imported in _imports(name)
        if imported in MODULES and _layer(imported) > _layer(name)
    ]
    assert not wrong


def test_no_import_cycle():
    graph = {name: {m for m in _imports(name) if m in MODULES and m != name} for name in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for child in sorted(graph[name]):
            if state.get(child) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, name, child]))
            if child not in state:
                visit(child, [*path, name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


@pytest.mark.parametrize(
    ("prefix", "forbidden"),
    [
        ("lrcompile.cli", {"onnx", "onnx_ir"}),
        ("lrcompile.numerics", {"onnx", "onnx_ir", "onnxruntime", "polygraphy"}),
        # No pass runs a model: ranges and statistics reach passes as data.
        ("lrcompile.passes", {"onnxruntime", "polygraphy", "lrcompile.runtime.sessions"}),
        ("lrcompile.passes", {"lrcompile.calibration.statistics", "lrcompile.calibration.ranges"}),
    ],
)
def test_packages_keep_to_their_own_dependencies(prefix, forbidden):
    offenders = {
        name: sorted(_imports(name) & forbidden)
        for name in MODULES
        if name.startswith(prefix) and _imports(name) & forbidden
    }
    assert not offenders


def test_tensorrt_is_imported_only_under_trt_and_the_plugin_module():
    allowed = ("lrcompile.trt", "lrcompile.plugins.low_rank_gemm")
    offenders = [n for n in MODULES if "tensorrt" in _imports(n) and not n.startswith(allowed)]
    assert not offenders


def test_modules_and_functions_are_small():
    large = []
    for name, path in MODULES.items():
        source = path.read_text()
        if source.count("\n") > MAX_MODULE_LINES:
            large.append(f"{name}: {source.count(chr(10))} lines")
        if name in KERNELS:
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    large.append(f"{name}.{node.name}: {length} lines")
    assert not large
