"""The imports point one way (docs/architecture.md): core at the bottom, then models, passes and
lowering, then targets, then the entry points. Read from the source (every ``import`` statement,
also those inside functions), so a lazy import cannot hide an edge."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("core", "models", "passes", "lowering", "targets")
LEAVES = {"errors", "progress"}  # top-level modules that import nothing of anefx's stages

# what each layer may import, besides itself and the leaves
ALLOWED = {
    "core": set(),
    "models": {"core"},
    "passes": {"core"},
    "lowering": {"core", "models"},
    "generation": {"core", "models", "lowering"},
    "targets": {"core", "models", "lowering", "generation"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("anefx", *parts))


def _sources() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        top = path.relative_to(ROOT).parts[0]
        if top in SUBPACKAGES or (len(path.relative_to(ROOT).parts) == 1):
            out[_module_name(path)] = path
    return out


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The anefx modules PATH imports (a ``from pkg import mod`` names the module ``pkg.mod``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("anefx.")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                ).rstrip(".")
            if not base.startswith("anefx"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m != "anefx"}


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    sources = _sources()
    g = nx.DiGraph()
    g.add_nodes_from(sources)
    for name, path in sources.items():
        for target in _imports(path, name, set(sources)):
            if target in sources:
                g.add_edge(name, target)
    return g


def _layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else "anefx"


def test_the_reader_sees_the_known_edges(graph: nx.DiGraph) -> None:
    """The test reads what it claims to: edges that exist are found (else it could pass empty)."""
    assert graph.has_edge("anefx.lowering.pipeline", "anefx.core.pass_registry")
    assert graph.has_edge("anefx.passes.split_lm_head", "anefx.core.rules")
    assert graph.has_edge("anefx.targets.chunked", "anefx.targets.split_packages")
    assert graph.number_of_edges() > 100


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_below_it(graph: nx.DiGraph, layer: str) -> None:
    allowed = ALLOWED[layer] | LEAVES | {layer}
    bad = sorted(
        f"{a} -> {b}" for a, b in graph.edges if _layer(a) == layer and _layer(b) not in allowed
    )
    assert not bad, f"{layer} imports outside {sorted(allowed)}:\n" + "\n".join(bad)


def test_passes_and_lowering_do_not_import_each_other(graph: nx.DiGraph) -> None:
    edges = [(a, b) for a, b in graph.edges if {_layer(a), _layer(b)} == {"passes", "lowering"}]
    assert not edges


@pytest.mark.parametrize("layer", ["core", "models", "passes", "lowering", "targets"])
def test_no_import_circle(graph: nx.DiGraph, layer: str) -> None:
    """Within a layer the modules import each other in one direction (a DAG)."""
    sub = graph.subgraph([m for m in graph if _layer(m) == layer])
    cycles = list(nx.simple_cycles(sub))
    assert not cycles, cycles


def test_no_private_names_across_modules() -> None:
    """A module of models/ does not reach into another's private names (``from x import _y``)."""
    sources = _sources()
    bad = []
    for name, path in sources.items():
        if _layer(name) != "models":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("anefx"):
                bad += [f"{name}: {node.module}.{a.name}" for a in node.names if a.name[0] == "_"]
    assert not bad, bad


def test_every_pass_module_registers_its_pass_and_the_pipeline_uses_them() -> None:
    """One pass per file, registered under the file's name; the pipeline (argmax included)
    names every registered pass and nothing else."""
    import pkgutil

    import anefx.passes
    from anefx.core.pass_registry import registered
    from anefx.lowering.pipeline import build_pipeline

    modules = {m.name for m in pkgutil.iter_modules(anefx.passes.__path__) if m.name[0] != "_"}
    passes = registered()
    assert set(passes) == modules
    assert all(spec.module == f"anefx.passes.{name}" for name, spec in passes.items())
    steps = build_pipeline(argmax=True)
    # a function pass's module, or a pass object's class's module
    used = {getattr(s.run, "__module__", None) for s in steps}
    assert used == {f"anefx.passes.{n}" for n in modules}
    assert "add_argmax_head" in {s.name for s in steps}
    assert "add_argmax_head" not in {s.name for s in build_pipeline(argmax=False)}


def test_only_targets_import_coremltools() -> None:
    """Lowering and checking run without coremltools (README: targets/ is the only folder that
    imports it)."""
    bad = []
    for name, path in _sources().items():
        if _layer(name) == "targets":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            bad += [f"{name}: {m}" for m in mods if m.split(".")[0] == "coremltools"]
    assert not bad, bad
