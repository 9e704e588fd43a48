"""The tree's shape: stages stand side by side on shared modules, no cycles, no private reach-ins.

Reads the import statements of every module (no import is executed) and checks the layering the
README's "Code layout" describes, so an import that makes one stage lean on another fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "release", "reviewer_app", "models")

EDGES = {"pipeline.cli", "pipeline.workflows", "reviewer_app.app", "reviewer_app.views"}
STAGES = {
    "pipeline.ingest": "ingest",
    "pipeline.phantom": "phantom",
    "pipeline.index": "filter",
    "pipeline.filtering": "filter",
    "pipeline.train": "train",
    "pipeline.generate": "generate",
    "pipeline.quality": "evaluate",
    "pipeline.utility": "evaluate",
    "pipeline.review": "review",
    "release.bundle": "export",
    "release.verify": "verify",
}


def modules() -> dict[str, Path]:
    """Every module of the project's packages (``__init__`` left out)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            if path.stem != "__init__":
                found[f"{package}.{path.stem}"] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> tuple[set[str], list[str]]:
    """The project modules ``name`` imports (at any depth of its code) and any private names
    it takes from another module."""
    tree = ast.parse(path.read_text())
    package = name.rsplit(".", 1)[0]
    used: set[str] = set()
    private: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = package + (f".{base}" if base else "")
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    used.add(f"{base}.{alias.name}")
                elif base in known:
                    used.add(base)
                    if alias.name.startswith("_"):
                        private.append(f"{name} imports {base}.{alias.name}")
        elif isinstance(node, ast.Import):
            used |= {a.name for a in node.names if a.name in known}
    source = path.read_text()
    for other in used:
        short = other.rsplit(".", 1)[1]
        for attr in re.findall(rf"\b{short}\.(_[a-z]\w*)", source):
            private.append(f"{name} uses {other}.{attr}")
    return used - {name}, private


def graph() -> tuple[dict[str, set[str]], list[str]]:
    known = modules()
    edges, private = {}, []
    for name, path in known.items():
        edges[name], bad = imports(name, path, set(known))
        private += bad
    return edges, private


def test_no_stage_imports_another_stage_or_an_edge():
    edges, _ = graph()
    wrong = [
        f"{a} → {b}"
        for a, targets in edges.items()
        if a in STAGES
        for b in targets
        if (b in STAGES and STAGES[b] != STAGES[a]) or b in EDGES
    ]
    assert not wrong, "stages must stand side by side: " + ", ".join(sorted(wrong))


def test_shared_and_base_modules_import_no_stage():
    edges, _ = graph()
    wrong = [
        f"{a} → {b}"
        for a, targets in edges.items()
        if a not in STAGES and a not in EDGES
        for b in targets
        if b in STAGES or b in EDGES
    ]
    assert not wrong, "shared ground must not stand on a stage: " + ", ".join(sorted(wrong))


def test_no_private_name_crosses_a_module():
    _, private = graph()
    assert not private, "; ".join(sorted(private))


def test_no_import_cycle():
    edges, _ = graph()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle.extend([*path[path.index(nxt) :], nxt])
                return True
            if nxt not in state and visit(nxt, [*path, nxt]):
                return True
        state[node] = 2
        return False

    for start in sorted(edges):
        if start not in state and visit(start, [start]):
            break
    assert not cycle, " → ".join(cycle)


def test_readme_layout_names_every_module():
    text = (ROOT / "README.md").read_text()
    layout = text.split("## Code layout", 1)[1].split("\n## ", 1)[0]
    missing = [
        name
        for name, path in modules().items()
        if path.relative_to(ROOT).as_posix() not in layout
        and not (f"{path.parent.name}/ " in layout and path.name in layout)
    ]
    listed = set(re.findall(r"\b((?:pipeline|release|models)/\w+\.py)", layout))
    gone = sorted(p for p in listed if not (ROOT / p).exists())
    assert not missing and not gone, f"missing in README: {missing}; no such module: {gone}"


def test_gan_config_imports_without_tensorflow():
    import subprocess
    import sys

    code = (
        "import sys; from models.config import GanConfig, preset; preset('tiny');"
        "print('tensorflow' in sys.modules or 'keras' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
