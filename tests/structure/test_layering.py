"""The package's layering, read from its own imports: no import cycle, and each layer imports only the ones
below it (the IR nothing of ours, backends are data, templates never drive the compiler, and the compiler's
stages run one way: analysis → rewrite → autodiff → codegen → runtime → tuning → aot)."""

import ast
import pathlib

import networkx as nx
import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "einflash"

# what each part may import besides itself (module prefixes, einflash. left out)
SHARED = ("errors", "knobs", "shape")
STAGES = ("analysis", "rewrite", "autodiff", "codegen", "runtime", "tuning", "aot")
ALLOWED = {
    "ir": ("errors",),
    "backends": ("errors", "knobs"),
    "templates": (),
    "errors": (),
    "knobs": ("errors",),
    "shape": ("errors",),
    "jagged": ("errors", "ir"),
    "testing": ("errors", "ir"),
    "compiler.schedule": (*SHARED, "backends", "compiler.schedule"),
    **{
        f"compiler.{s}": (
            *SHARED,
            "ir",
            "backends",
            "templates",
            "jagged",
            "testing",
            "compiler.schedule",
            *(f"compiler.{t}" for t in STAGES[: i + 1]),
        )
        for i, s in enumerate(STAGES)
    },
}


def _module(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> nx.DiGraph:
    """Every einflash module, with an edge to each einflash module it imports (at any depth of its code)."""
    g = nx.DiGraph()
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    for name, path in modules.items():
        g.add_node(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        # imports for type annotations only (under ``if TYPE_CHECKING:``) are no dependency at run time
        typing_only = {
            id(n)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
            for n in ast.walk(block)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                names = [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                target, names = "", [a.name for a in node.names]
            else:
                continue
            for full in names + [target]:
                if full in modules and full != name:
                    g.add_edge(name, full)
                    break
    return g


def _part(module: str) -> str:
    rest = module.removeprefix("einflash.")
    for part in sorted(ALLOWED, key=len, reverse=True):
        if rest == part or rest.startswith(part + "."):
            return part
    return rest


def test_no_import_cycles():
    cycles = [sorted(c) for c in nx.strongly_connected_components(_imports()) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_each_part_imports_only_the_layers_below_it(part):
    g = _imports()
    bad = sorted(
        (a, b)
        for a, b in g.edges
        if _part(a) == part
        and _part(b) != part
        and _part(b) not in ALLOWED[part]
        and not any(_part(b).startswith(x + ".") for x in ALLOWED[part])
    )
    assert not bad, f"{part} imports what it may not: {bad}"
