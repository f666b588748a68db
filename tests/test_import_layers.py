"""The package's dependency direction, checked on the source (every import statement, module level and inside
functions):

    common <- kernels, data_pipeline <- model <- parallel, diffusion, config, checkpoint <- training, inference
           <- eval <- demo <- cli

A module may import its own package and packages of a lower layer; never a sibling of its own layer, never a
higher one. Module-level imports must also form no cycle inside a package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folder on disk -> the package name it is installed under (pyproject.toml's package-dir).
SOURCE_DIRS = {"megafusion": ROOT / "megafusion", "megafusion.kernels": ROOT / "kernels",
               "megafusion.data_pipeline": ROOT / "data_pipeline"}
LAYERS = {
    "common": 0,
    "kernels": 1, "data_pipeline": 1,
    "model": 2,
    "parallel": 3, "diffusion": 3, "config": 3, "checkpoint": 3,
    "training": 4, "inference": 4,
    "eval": 5,
    "demo": 6,
    "cli": 7,
    "__main__": 8, "__init__": 8,
}
# The public API keeps LlamaFusion.from_llama/from_pretrained/save_pretrained on the model class; they are thin,
# function-level delegations to the checkpoint layer (the only upward imports allowed).
DELEGATIONS = {("megafusion.model.fusion", "megafusion.checkpoint.fusion_io")}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in SOURCE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__" and len(parts) > 1:
                parts = parts[:-1]
            name = ".".join([package, *parts]) if parts != ["__init__"] else package
            if package == "megafusion" and parts and parts[0] in ("kernels", "data_pipeline"):
                continue
            found[name] = path
    return found


MODULES = _modules()


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(module: str, path: Path) -> list[tuple[str, bool, int]]:
    """(imported megafusion module, at module level?, line) for every import statement."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # imports under `if TYPE_CHECKING:` do not run: treat them as not module level
        if isinstance(node, ast.If):
            top_level.update(id(n) for n in node.body if "TYPE_CHECKING" not in ast.unparse(node.test))
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_pkg else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for name in names:
            if name == "megafusion" or name.startswith("megafusion."):
                out.append((name, id(node) in top_level, node.lineno))
    return out


def test_every_package_has_a_layer():
    unknown = sorted({_package(m) for m in MODULES} - set(LAYERS))
    assert not unknown, f"packages without a layer in LAYERS (add them where they belong): {unknown}"


def test_no_import_points_up_or_sideways():
    bad = []
    for module, path in MODULES.items():
        src = _package(module)
        for target, _, line in _imports(module, path):
            dst = _package(target)
            if dst == src or target == "megafusion" or (module, target) in DELEGATIONS:
                continue
            if LAYERS[dst] >= LAYERS[src]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {module} ({src}) imports {target} ({dst})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_data_pipeline_needs_only_common():
    for module, path in MODULES.items():
        if _package(module) != "data_pipeline":
            continue
        for target, _, line in _imports(module, path):
            assert _package(target) in ("data_pipeline", "common"), f"{path}:{line}: imports {target}"


def test_training_does_not_reach_into_demo_data():
    """Built-in datasets are resolved behind data_pipeline's public functions, not by the trainer."""
    for module, path in MODULES.items():
        if _package(module) in ("training", "model", "checkpoint", "parallel"):
            for target, _, line in _imports(module, path):
                assert not target.startswith("megafusion.data_pipeline.demo"), f"{path}:{line}: imports {target}"


def test_module_level_imports_have_no_cycle():
    graph = {m: {t for t, top, _ in _imports(m, p) if top and t in MODULES and t != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_checker_sees_violations(tmp_path):
    """The walk must find function-level and relative imports, or the tests above could not fail."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from megafusion.training import trainer\nfrom .layout import TEXT\n")
    found = _imports("megafusion.model.probe", probe)
    assert ("megafusion.training.trainer", False, 2) in found or ("megafusion.training", False, 2) in found
    assert ("megafusion.model.layout", True, 3) in found
