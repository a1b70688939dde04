"""The package's import rules, read from the source with ``ast`` (nothing is imported).

The rules (DESIGN §3):

1. Layers, lowest first; a module imports only from its own layer or lower ones::

       core <- layers <- injection <- distributed <- formats
            <- merging, optim, checkpoints, passthrough <- model <- files
            <- integrations, training, serving (and the hf/peft namespaces) <- cli, the package root

2. No import cycle between modules.
3. No import of the package's own modules inside a function (a hidden import dodges a cycle).
4. No private name (``_name``) imported from another package (each top-level module counts as its
   own package).
5. Heavy optional libraries (transformers, bitsandbytes, HTTP and vLLM code, peft, matplotlib) are not
   imported at module level below the edges (integrations, training, serving, cli, hf, peft).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "vblora"

LAYERS: list[tuple[str, ...]] = [
    ("core", "version"),
    ("layers",),
    ("injection",),
    ("distributed",),
    ("formats",),
    ("merging", "optim", "checkpoints", "passthrough"),
    ("model",),
    ("files",),
    ("integrations", "training", "serving", "hf", "peft"),
    ("cli", "__main__", "__init__"),
]
EDGES = {"integrations", "training", "serving", "cli", "hf", "peft", "__main__"}
HEAVY = {
    "transformers",
    "bitsandbytes",
    "fastapi",
    "uvicorn",
    "starlette",
    "httpx",
    "openai",
    "vllm",
    "peft",
    "matplotlib",
}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _unit(module: str) -> str:
    """The first component below ``vblora``: the layer entry a module belongs to."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def _rank(module: str) -> int:
    unit = _unit(module)
    for rank, units in enumerate(LAYERS):
        if unit in units:
            return rank
    raise AssertionError(f"{module}: its unit {unit!r} is in no layer; add it to LAYERS")


def _package(module: str) -> str:
    """Subpackages (core, layers, ...) are packages; each top-level module is its own."""
    return ".".join(module.split(".")[:2])


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    is_package = MODULES[importer].name == "__init__.py"
    base = importer.split(".")
    if node.level:
        base = base if is_package else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join([*base, *([node.module] if node.module else [])])
    return node.module or ""


def _targets(importer: str, node: ast.AST) -> list[tuple[str, str | None]]:
    """(module imported, name imported or None) for an import statement."""
    if isinstance(node, ast.Import):
        return [(alias.name, None) for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    base = _resolve(importer, node)
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append((sub, None) if sub in MODULES else (base, alias.name))
    return out


def _imports(module: str) -> list[tuple[ast.AST, bool, str, str | None]]:
    """Every import of ``module``: (node, at module level, target module, name)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target, name in _targets(module, child):
                    found.append((child, top, target, name))
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(tree, True)
    return found


def _is_type_checking_block(module: str, node: ast.AST) -> bool:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    line = getattr(node, "lineno", -1)
    for block in ast.walk(tree):
        guarded = isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
        if guarded and any(getattr(n, "lineno", -2) == line for n in ast.walk(block)):
            return True
    return False


def _internal(target: str) -> bool:
    return target == "vblora" or target.startswith("vblora.")


def test_every_module_has_a_layer() -> None:
    assert len(MODULES) > 20
    for module in MODULES:
        _rank(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_one_way(module: str) -> None:
    for node, _, target, _ in _imports(module):
        if not _internal(target) or _is_type_checking_block(module, node):
            continue
        assert _rank(target) <= _rank(module), (
            f"{module} (layer {_unit(module)}) imports {target} (layer {_unit(target)}), "
            f"line {node.lineno}: imports must run core <- layers <- ... <- cli"
        )


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_hidden_imports_of_the_package(module: str) -> None:
    for node, top, target, _ in _imports(module):
        assert top or not _internal(target), (
            f"{module}, line {node.lineno}: imports {target} inside a function; import it at the top "
            "(an import hidden in a function dodges a cycle)"
        )


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_across_packages(module: str) -> None:
    for node, _, target, name in _imports(module):
        if not _internal(target) or name is None or not name.startswith("_") or name.startswith("__"):
            continue
        assert _package(target) == _package(module), (
            f"{module}, line {node.lineno}: imports the private {name} of {target}; make it public "
            "or keep it inside its package"
        )


@pytest.mark.parametrize("module", sorted(MODULES))
def test_heavy_libraries_only_at_the_edges(module: str) -> None:
    if _unit(module) in EDGES:
        return
    for node, top, target, _ in _imports(module):
        root = target.split(".")[0]
        if top and root in HEAVY and not _is_type_checking_block(module, node):
            pytest.fail(
                f"{module}, line {node.lineno}: imports {target} at module level; import it lazily "
                "where it is used, or move the code to an edge (integrations, training, serving, cli)"
            )


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for node, top, target, _ in _imports(module):
            if _internal(target) and top and not _is_type_checking_block(module, node):
                # "from vblora.x import y": the target module; a package import runs its __init__
                graph[module].add(target if target in MODULES else target.rsplit(".", 1)[0])
    cycles = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(graph.get(module, ())):
            if nxt == module:
                continue  # a package importing its own submodule through itself
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # a package's __init__ importing its own submodules, which import siblings, is not a cycle
    real = [c for c in cycles if not all(c[0].startswith(m) or m.startswith(c[0]) for m in c)]
    assert not real, f"import cycles: {real}"


def test_one_place_names_the_base_layer_types() -> None:
    """Adding a layer kind is one module under layers/ plus one entry in layers/base.py's KINDS."""
    naming = []
    for module, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        if "isinstance(module, nn.Linear)" in text or '"Conv1D"' in text:
            naming.append(module)
    assert naming == ["vblora.layers.linear"], naming
