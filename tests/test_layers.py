"""The package's layers (docs/architecture.md): each module imports only from the layers it may.

Reads every module's imports (top-level and inside functions, relative ones resolved) with ``ast``;
nothing is imported, so the test is fast and independent of which backends are available.
"""
from __future__ import annotations

import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ddpm_fast")

# module (or package prefix) -> layer; the first matching prefix wins (longest first below)
LAYERS = {
    "ddpm_fast.reference": 0, "ddpm_fast.noise": 0, "ddpm_fast.schedule": 0, "ddpm_fast.step_options": 0,
    "ddpm_fast.backends._op_glue": 2,
    "ddpm_fast.backends.reference": 3, "ddpm_fast.backends.native": 3, "ddpm_fast.backends.triton": 3,
    "ddpm_fast.backends": 4, "ddpm_fast.ops": 4,
    "ddpm_fast.schedulers": 5, "ddpm_fast.sampling": 5, "ddpm_fast.training": 5, "ddpm_fast.distributed": 5,
    "ddpm_fast.tools": 6, "ddpm_fast.__main__": 6,
}
# leaves every layer may import: named profiler ranges, tensor facts, the native builder, the libraries
LEAVES = ("ddpm_fast.nvtx", "ddpm_fast._tensors", "ddpm_fast._build", "ddpm_fast._C", "ddpm_fast._C_cuda")
BACKENDS = ("ddpm_fast.backends.reference", "ddpm_fast.backends.native", "ddpm_fast.backends.triton")


def _layer(mod: str):
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if mod == prefix or mod.startswith(prefix + "."):
            return prefix, LAYERS[prefix]
    return None, None


def _module_name(path: str, pkg: str = PKG) -> str:
    rel = os.path.relpath(path, os.path.dirname(pkg))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str, pkg: str = PKG):
    """Every ddpm_fast module ``path`` imports (``from X import name`` counts X and X.name, since
    the name may be a submodule), as absolute names."""
    mod = _module_name(path, pkg)
    package = mod.split(".") if path.endswith("__init__.py") else mod.split(".")[:-1]
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("ddpm_fast"):
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ddpm_fast"))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("ddpm_fast")):
            found.add(node.args[0].value)
    return mod, found


def _modules():
    for d, _, files in os.walk(PKG):
        for f in sorted(files):
            if f.endswith(".py"):
                yield os.path.join(d, f)


def _allowed(mod: str, layer: int, own: str, dep: str) -> bool:
    dep_prefix, dep_layer = _layer(dep)
    if dep == "ddpm_fast" or dep.startswith(LEAVES) or dep_prefix == own:
        return True  # the package's top (re-exports), a leaf, or the module's own package
    if dep_layer is None:
        if dep.count(".") == 1 and not os.path.exists(os.path.join(PKG, dep.split(".")[1] + ".py")):
            return layer >= 5  # a name the package's top exports (it re-exports layers 4 and 5)
        return False  # a module no layer names: it must be placed before it is used
    if own == "ddpm_fast.backends" and dep.startswith(BACKENDS):
        return True  # the registry imports the backends, lazily, by name
    if layer == 3:
        # a backend: the layers below and its own registration, never another backend
        return dep_layer < 3 or (dep.startswith(BACKENDS) and dep_prefix == own)
    if layer == 5 and dep.startswith(BACKENDS + ("ddpm_fast.backends._op_glue",)):
        return False  # users of the ops never call a backend directly
    return dep_layer <= layer


def test_every_module_has_a_layer():
    unplaced = []
    for path in _modules():
        mod = _module_name(path)
        if mod != "ddpm_fast" and not mod.startswith(LEAVES) and _layer(mod)[1] is None:
            unplaced.append(mod)
    assert not unplaced, f"modules no layer names (add them to docs/architecture.md and LAYERS): {unplaced}"


@pytest.mark.parametrize("path", list(_modules()), ids=lambda p: _module_name(p))
def test_imports_follow_the_layers(path):
    mod, deps = _imports(path)
    if mod == "ddpm_fast":
        return  # the package's top re-exports the public API
    own, layer = _layer(mod)
    if layer is None:  # a leaf: imports nothing of the package but other leaves
        bad = sorted(d for d in deps if not d.startswith(LEAVES) and d != "ddpm_fast")
    else:
        bad = sorted(d for d in deps if not _allowed(mod, layer, own, d))
    assert not bad, f"{mod} (layer {layer}) imports {bad}, against docs/architecture.md"


def test_the_checker_sees_a_violation(tmp_path):
    """The rule is not vacuous: a sampling module calling a backend directly is caught."""
    assert not _allowed("ddpm_fast.sampling", 5, "ddpm_fast.sampling", "ddpm_fast.backends.native")
    assert not _allowed("ddpm_fast.reference", 0, "ddpm_fast.reference", "ddpm_fast.ops")
    assert not _allowed("ddpm_fast.backends.triton._helpers", 3, "ddpm_fast.backends.triton", "ddpm_fast.ops")
    assert not _allowed("ddpm_fast.backends.native", 3, "ddpm_fast.backends.native", "ddpm_fast.backends.triton")
    assert _allowed("ddpm_fast.tools.bench.specs", 6, "ddpm_fast.tools", "ddpm_fast.backends.reference")
    pkg = tmp_path / "ddpm_fast"
    (pkg / "tools").mkdir(parents=True)
    p = pkg / "tools" / "m.py"
    p.write_text("def f():\n    from ..ops import x\n    from . import bench\n")
    # relative imports inside functions are resolved against the module's package
    mod, deps = _imports(str(p), str(pkg))
    assert mod == "ddpm_fast.tools.m"
    assert deps == {"ddpm_fast.ops", "ddpm_fast.ops.x", "ddpm_fast.tools", "ddpm_fast.tools.bench"}
