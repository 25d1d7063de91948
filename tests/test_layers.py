"""The layer picture of docs/architecture.md ("Layers"), enforced: no import
cycle anywhere in ``fanout/`` and every import goes down the layers, or stays
in its own layer. Imports inside functions and under ``TYPE_CHECKING`` count:
an import that only works because it runs late is still a cycle.

The import graph is read from the source (``ast``), not by importing it:
``import a.b``, ``from a import b`` (the submodule ``a.b`` when there is one,
else the module ``a``) and relative imports all resolve to modules of
``fanout``. Importing a submodule runs its package's ``__init__`` too, but that
is not an edge: a package may import its own modules without a cycle.
"""

from __future__ import annotations

import ast
import fnmatch
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"

#: The layers, lowest first: a module may import from its own layer and the
#: ones before it, never from one after it. Patterns are ``fnmatch`` patterns
#: over dotted module names; every module of ``fanout`` must match one, and the
#: most specific match places it (a name beats a wildcard, a longer fixed
#: prefix beats a shorter one). The same table is in docs/architecture.md
#: (checked below).
LAYERS: list[tuple[str, list[str]]] = [
    (
        "foundation",
        [
            "fanout.errors",
            "fanout.retry",
            "fanout.logs",
            "fanout.isolation",
            "fanout.processes",
            "fanout.avro_check",
            "fanout.avro_blocks",
            "fanout.fairness",
            "fanout.outcomes",
            "fanout.json_fields",
            "fanout.filestamp",
            "fanout.schema_diff",
        ],
    ),
    ("seams", ["fanout.backends.base", "fanout.backends.crawlstate", "fanout.backends.keys"]),
    ("backends", ["fanout.backends", "fanout.backends.*"]),
    (
        "services",
        [
            "fanout.messages",
            "fanout.avro",
            "fanout.inputs",
            "fanout.events",
            "fanout.metrics",
            "fanout.cost",
            "fanout.failures",
            "fanout.chunklog",
            "fanout.batching",
            "fanout.tables",
            "fanout.tables.*",
        ],
    ),
    (
        "jobs",
        [
            "fanout.limits",
            "fanout.settings",
            "fanout.context",
            "fanout.jobs",
            "fanout.packaged",
            "fanout",
        ],
    ),
    ("crawl", ["fanout.crawl", "fanout.crawl.*"]),
    (
        "runs",
        [
            "fanout.spawn",
            "fanout.controls",
            "fanout.control_gate",
            "fanout.control_ops",
            "fanout.tables.writer",
            "fanout.finalize",
            "fanout.phases",
            "fanout.runner",
            "fanout.coordinator",
        ],
    ),
    ("schedules", ["fanout.schedules", "fanout.schedules.*"]),
    ("batches", ["fanout.batches"]),
    ("dispatch", ["fanout.dispatch"]),
    ("hosts", ["fanout.worker", "fanout.worker_slot", "fanout.aws_lambda"]),
    (
        "interfaces",
        [
            "fanout.cli",
            "fanout.cli_*",
            "fanout.deploy",
            "fanout.deploy_layer",
            "fanout.deploy_files",
            "fanout.ui",
            "fanout.ui.*",
        ],
    ),
]


def modules(root: Path, package: str = "fanout") -> dict[str, Path]:
    """Every module of ``package`` under ``root``, by dotted name."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(root: Path, package: str = "fanout") -> dict[str, dict[str, int]]:
    """For each module of ``package``, the modules of ``package`` it imports,
    anywhere in its source, each with the line of its first import."""
    mods = modules(root, package)

    def owner(name: str) -> str | None:
        # "fanout.x.y" names module fanout.x.y, or (an attribute) module fanout.x.
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                subs = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in mods]
                # A name that is not a submodule comes from the module itself.
                targets = subs + ([source] if len(subs) < len(node.names) else [])
            for target in targets:
                if target != package and not target.startswith(package + "."):
                    continue
                module = owner(target)
                if module is not None and module != name:
                    edges.setdefault(module, node.lineno)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str, layers: list[tuple[str, list[str]]]) -> int | None:
    """The index of the layer of the most specific pattern matching ``module``
    (None: no pattern matches)."""

    def specificity(pattern: str) -> tuple[bool, int]:
        wild = any(c in pattern for c in "*?[")
        return (not wild, len(pattern.split("*")[0]))

    matches = [
        (specificity(p), i)
        for i, (_, patterns) in enumerate(layers)
        for p in patterns
        if fnmatch.fnmatchcase(module, p)
    ]
    return max(matches)[1] if matches else None


def upward(graph: dict[str, dict[str, int]], layers: list[tuple[str, list[str]]]) -> Iterator[str]:
    """Each import that goes up the layers, as a line to print."""
    for module, edges in sorted(graph.items()):
        mine = layer_of(module, layers)
        for target, line in sorted(edges.items()):
            theirs = layer_of(target, layers)
            if mine is not None and theirs is not None and theirs > mine:
                yield (
                    f"{module} (layer {layers[mine][0]}) imports {target}"
                    f" (layer {layers[theirs][0]}) at line {line}"
                )


def describe_cycles(graph: dict[str, dict[str, int]]) -> list[str]:
    lines = []
    for component in cycles(graph):
        members = set(component)
        edges = [
            f"{a} -> {b} (line {n})"
            for a in component
            for b, n in sorted(graph[a].items())
            if b in members
        ]
        lines.append(f"cycle {component}: " + "; ".join(edges))
    return lines


# -- the checks on fanout itself ---------------------------------------------------------


def test_no_import_cycle_in_fanout() -> None:
    problems = describe_cycles(imports(REPO))
    assert not problems, "\n".join(problems)


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(m for m in modules(REPO) if layer_of(m, LAYERS) is None)
    assert not unplaced, f"place these modules in a layer (here and in {DOC.name}): {unplaced}"


def test_every_import_goes_down_the_layers() -> None:
    problems = list(upward(imports(REPO), LAYERS))
    assert not problems, "\n".join(problems)


def test_the_documented_layers_are_the_enforced_ones() -> None:
    """docs/architecture.md shows this very table, row by row, top layer first."""
    text = DOC.read_text()
    rows = [f"| {name} | {', '.join(f'`{p}`' for p in patterns)} |" for name, patterns in LAYERS]
    missing = [row for row in rows if row not in text]
    assert not missing, f"{DOC.name} lacks these rows of its layer table: {missing}"
    positions = [text.index(row) for row in rows]
    assert positions == sorted(positions, reverse=True), "the table lists the top layer first"


#: Issue 11: no module of fanout over this many lines (one job a module).
MAX_MODULE_LINES = 600


def test_no_module_is_over_600_lines() -> None:
    sizes = {
        str(path.relative_to(REPO)): len(path.read_text(encoding="utf-8").splitlines())
        for path in (REPO / "fanout").rglob("*.py")
    }
    assert sizes and {m: n for m, n in sizes.items() if n >= MAX_MODULE_LINES} == {}


def test_every_design_note_cited_exists() -> None:
    """Code that cites docs/architecture.md names a section it has."""
    headings = {
        line.lstrip("#").strip() for line in DOC.read_text().splitlines() if line.startswith("#")
    }
    cited = []
    sources = [*sorted((REPO / "fanout").rglob("*.py")), *sorted((REPO / "tests").glob("*.py"))]
    for path in sources:
        if path == Path(__file__).resolve():
            continue  # this checker, which spells out what it looks for
        text = path.read_text()
        gone = "DESIGN.md"
        assert gone not in text, f"{path} cites {gone}, which is not in the repository"
        for part in text.split("docs/architecture.md")[1:]:
            # The section follows the path: docs/architecture.md, "Section".
            rest = part.lstrip(",").lstrip()
            if rest.startswith('"'):
                section = rest[1:].split('"', 1)[0]
                cited.append((path.name, section))
    assert cited, "no module cites a section"
    unknown = [(name, section) for name, section in cited if section not in headings]
    assert not unknown, f"sections cited but not in {DOC.name}: {unknown}"


# -- the checker itself finds what it must ------------------------------------------------


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checker_finds_a_cycle_hidden_inside_a_function(tmp_path: Path) -> None:
    root = write(
        tmp_path,
        {
            "fanout/__init__.py": "",
            "fanout/low.py": "def f():\n    from fanout.high import g\n    return g\n",
            "fanout/high.py": "from fanout import low\n",
            "fanout/other.py": "from fanout.low import f\n",
        },
    )
    graph = imports(root)
    assert graph["fanout.low"] == {"fanout.high": 2}  # the function-level import
    assert graph["fanout.high"] == {"fanout.low": 1}  # "from fanout import low": the submodule
    assert cycles(graph) == [["fanout.high", "fanout.low"]]


def test_the_checker_finds_cycles_through_a_package_and_relative_imports(
    tmp_path: Path,
) -> None:
    root = write(
        tmp_path,
        {
            "fanout/__init__.py": "",
            "fanout/pkg/__init__.py": "from fanout.pkg.mod import X\nY = 1\n",
            "fanout/pkg/mod.py": "from . import Y\nX = Y\n",
            "fanout/typed.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .other import T\n"
            ),
            "fanout/other.py": "import fanout.typed\nT = 1\n",
        },
    )
    assert cycles(imports(root)) == [
        ["fanout.other", "fanout.typed"],
        ["fanout.pkg", "fanout.pkg.mod"],
    ]


def test_the_checker_finds_an_upward_import(tmp_path: Path) -> None:
    root = write(
        tmp_path,
        {
            "fanout/__init__.py": "",
            "fanout/base.py": "def f():\n    import fanout.top.x\n",
            "fanout/top/__init__.py": "",
            "fanout/top/x.py": "from fanout.base import f\n",
        },
    )
    layers = [("low", ["fanout", "fanout.base"]), ("high", ["fanout.*"])]
    assert layer_of("fanout.base", layers) == 0  # the name beats the wildcard
    assert layer_of("fanout.top.x", layers) == 1
    assert layer_of("other.x", layers) is None
    assert list(upward(imports(root), layers)) == [
        "fanout.base (layer low) imports fanout.top.x (layer high) at line 2"
    ]


def test_only_the_hosts_import_the_dispatcher() -> None:
    graph = imports(REPO)
    importers = sorted(m for m, edges in graph.items() if "fanout.dispatch" in edges)
    assert importers == ["fanout.aws_lambda", "fanout.worker"]


def key_literals(path: Path) -> list[tuple[int, str]]:
    """String literals and f-strings of ``path`` (docstrings aside) that start
    like a key of the store's layout."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    parts = {
        id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in parts:
            continue  # seen as its f-string
        if isinstance(node, ast.JoinedStr) and node.values:
            first = node.values[0]
            text = first.value if isinstance(first, ast.Constant) else ""
        elif isinstance(node, ast.Constant) and id(node) not in docstrings:
            text = node.value
        else:
            continue
        if isinstance(text, str) and text.startswith(("runs/", "dead-letters/")):
            found.append((node.lineno, text))
    return found


def test_the_store_layout_is_spelled_in_one_module() -> None:
    """Keys under ``runs/`` and ``dead-letters/`` are built by fanout.backends.keys
    only; everything else calls it."""
    keys = REPO / "fanout" / "backends" / "keys.py"
    assert key_literals(keys), "the checker finds the layout where it is"
    spelled = {
        str(path.relative_to(REPO)): found
        for path in sorted((REPO / "fanout").rglob("*.py"))
        if path != keys and (found := key_literals(path))
    }
    assert not spelled, f"store keys spelled outside fanout/backends/keys.py: {spelled}"
