"""The package layering of docs/ARCHITECTURE.md ("Package layering"), checked on every import in the code.

Every module of ``dynmoe_dist`` is parsed with ``ast``; every import it makes, at module level or inside a function,
is resolved to the unit it names (a subpackage such as ``dispatch``, or a top-level module such as ``placement``).
A unit may import units of lower tiers only, never one of its own tier or above. On top of that the control plane
(``adapt``) reaches the data plane only through the layer object and the placement table: it imports neither the
dispatcher nor the experts nor the gates, and it sets no attribute of a layer except the recorder it installs.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = "dynmoe_dist"
ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / PACKAGE

# Lowest first. A unit may import any unit of a lower tier. Keep this in step with docs/ARCHITECTURE.md.
TIERS: list[tuple[str, ...]] = [
    ("errors",),
    ("extras", "_allocator", "placement", "routing", "experts"),
    ("parallel",),
    ("dispatch",),
    ("layer",),
    ("optim", "__init__"),  # __init__: the package root, which re-exports MoELayer and the errors
    ("adapt", "checkpoint"),
    ("compat", "hf"),  # hf: Hugging Face models on MoELayer (convert, upcycle, export)
    ("train",),  # the application may use the drop-ins and the Hugging Face package
    ("cli",),
    ("__main__",),  # any ``__main__.py``: ``python -m dynmoe_dist.train`` runs the console script's function
]
TIER = {unit: level for level, units in enumerate(TIERS) for unit in units}

# The control plane's imports, by module: the layer object, its optimizer, the placement table, routing statistics
# (not the gates), process groups and collectives, errors.
CONTROL_PLANE = "adapt"
CONTROL_PLANE_MAY_IMPORT = (
    "dynmoe_dist.errors",
    "dynmoe_dist.placement",
    "dynmoe_dist.routing.plan",
    "dynmoe_dist.parallel",
    "dynmoe_dist.layer",
    "dynmoe_dist.optim",
)
# Attributes of a layer the control plane may set: its observer, and that observer's switch. Everything else it
# changes goes through MoELayer.install(table, next_expert_id).
CONTROL_PLANE_MAY_SET = ("recorder", "active")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> list[Path]:
    return sorted(SOURCE.rglob("*.py"))


def imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in ``path``, at any depth (functions, classes, conditionals)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                if node.module:
                    found.append((".".join([*base, node.module]), node.lineno))
                else:  # from .. import a, b: each name may be a module of that package
                    found += [(".".join([*base, alias.name]), node.lineno) for alias in node.names]
            elif node.module:
                found.append((node.module, node.lineno))
    return found


def unit_of_module(name: str) -> str:
    """The unit a dotted module name belongs to: ``dynmoe_dist.dispatch.shadow`` -> ``dispatch``."""
    parts = name.split(".")
    if parts[-1] == "__main__":
        return "__main__"
    return parts[1] if len(parts) > 1 else "__init__"


def unit_of_file(path: Path) -> str:
    return unit_of_module(module_name(path))


def internal(target: str) -> bool:
    return target == PACKAGE or target.startswith(PACKAGE + ".")


def violations() -> set[tuple[str, str]]:
    found = set()
    for path in modules():
        src = unit_of_file(path)
        for target, _line in imports(path):
            if not internal(target):
                continue
            dst = unit_of_module(target)
            if dst != src and TIER[dst] >= TIER[src]:
                found.add((module_name(path), target))
    return found


def test_every_unit_has_a_tier() -> None:
    units = {unit_of_file(p) for p in modules()}
    assert units - set(TIER) == set(), "add the new package to TIERS here and to docs/ARCHITECTURE.md"
    assert set(TIER) - units == set(), "a tier names a unit that no longer exists"


def test_imports_go_down_the_tiers_only() -> None:
    new = violations()
    details = [
        f"{module_name(p)}:{line} imports {t} ({unit_of_file(p)} is tier {TIER[unit_of_file(p)]}, "
        f"{unit_of_module(t)} is tier {TIER[unit_of_module(t)]})"
        for p in modules()
        for t, line in imports(p)
        if (module_name(p), t) in new
    ]
    assert not details, "\n".join(details)


def test_the_control_plane_imports_only_its_doors() -> None:
    bad = []
    for path in (SOURCE / CONTROL_PLANE).rglob("*.py"):
        for target, line in imports(path):
            if not internal(target) or unit_of_module(target) == CONTROL_PLANE:
                continue
            if not any(target == ok or target.startswith(ok + ".") for ok in CONTROL_PLANE_MAY_IMPORT):
                bad.append(f"{module_name(path)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def _names_a_layer(node: ast.expr) -> bool:
    """True when an attribute chain mentions a layer (``layer``, ``self.layer``, ``self.layers[i]``, ...)."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and "layer" in sub.id:
            return True
        if isinstance(sub, ast.Attribute) and "layer" in sub.attr:
            return True
    return False


def test_the_control_plane_sets_no_layer_attribute_but_its_recorder() -> None:
    bad = []
    for path in (SOURCE / CONTROL_PLANE).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            for t in targets:
                if isinstance(t, ast.Attribute) and _names_a_layer(t.value) and t.attr not in CONTROL_PLANE_MAY_SET:
                    bad.append(f"{module_name(path)}:{node.lineno} sets .{t.attr} of a layer")
    assert not bad, "\n".join(bad)


def test_the_library_never_imports_the_benchmarks() -> None:
    bad = [
        f"{module_name(p)}:{line} imports {t}"
        for p in modules()
        for t, line in imports(p)
        if t == "benchmarks" or t.startswith("benchmarks.")
    ]
    assert not bad, "benchmarks/ is not installed with the wheel:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from ..layer import MoELayer\n", "dynmoe_dist.layer"),
        ("def f():\n    from ..dispatch.shadow import x\n", "dynmoe_dist.dispatch.shadow"),
        ("from .. import placement\n", "dynmoe_dist.placement"),
        ("import dynmoe_dist.train.app\n", "dynmoe_dist.train.app"),
    ],
)
def test_imports_are_resolved_at_any_depth(
    tmp_path: Path, source: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parser this test relies on: relative, function-local and absolute imports all resolve to their module."""
    fake_root = tmp_path
    target = fake_root / PACKAGE / "parallel" / "grads.py"
    target.parent.mkdir(parents=True)
    target.write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
    assert [name for name, _ in imports(target)] == [expected]


def test_a_forbidden_import_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A routing module importing the dispatcher (a higher tier) is reported."""
    pkg = tmp_path / PACKAGE
    (pkg / "routing").mkdir(parents=True)
    (pkg / "routing" / "bad.py").write_text("def f():\n    from ..dispatch import local\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "SOURCE", pkg)
    assert violations() == {("dynmoe_dist.routing.bad", "dynmoe_dist.dispatch")}
