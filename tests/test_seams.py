"""The seams between qsearch's parts: torch-free config, no import cycles, one-way arrows,
no private attributes of other libraries."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "qsearch"


# --------------------------------------------------------------------------- import graph


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _top_level_imports(tree: ast.Module, module: str, is_pkg: bool) -> set[str]:
    """Modules imported when ``module`` is imported: top-level statements only (imports in
    functions run later; ``if TYPE_CHECKING:`` blocks never run)."""
    out: set[str] = set()

    def visit(stmts: list[ast.stmt]) -> None:
        for node in stmts:
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if is_pkg else module.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                out.add(target)
                out.update(f"{target}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If) and not _is_type_checking(node):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(tree.body)
    return out


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text())
        edges: set[str] = set()
        for target in _top_level_imports(tree, mod, path.name == "__init__.py"):
            if not target.startswith("qsearch"):
                continue
            parts = target.split(".")
            # Importing a.b.c imports a, a.b and a.b.c (except the packages containing us).
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name in files and not (mod == name or mod.startswith(name + ".")):
                    edges.add(name)
        graph[mod] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_the_graph_sees_imports() -> None:
    """Guard for the cycle test: the graph holds the edges it should."""
    g = import_graph()
    assert "qsearch.config.trial" in g["qsearch.config.study"]
    assert "qsearch.methods.plugin" in g["qsearch.train.trainer"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    assert _cycles(import_graph()) == []


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_arrows_point_one_way() -> None:
    """config is the bottom layer; train knows nothing of search or store, and of methods
    only their plug-in interface."""
    g = import_graph()
    for mod in g:
        reach = _reach(g, mod)
        if mod.startswith("qsearch.config"):
            bad = {r for r in reach if not r.startswith(("qsearch.config", "qsearch.errors"))
                   and r != "qsearch"}
            assert not bad, f"{mod} imports {bad}"
        if mod.startswith("qsearch.train"):
            bad = {r for r in reach if r.startswith(("qsearch.search", "qsearch.store",
                                                     "qsearch.cli", "qsearch.protocol"))}
            bad |= {r for r in g[mod] if r.startswith("qsearch.methods.")
                    and r != "qsearch.methods.plugin"}
            assert not bad, f"{mod} imports {bad}"


# --------------------------------------------------------------------------- torch-free


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_config_and_every_study_spec_parse_without_torch() -> None:
    code = (
        "import sys, glob\n"
        "import qsearch.config as c\n"
        "specs = sorted(glob.glob('studies/*.yaml'))\n"
        "assert specs\n"
        "for f in specs:\n"
        "    s = c.load_study_spec(f)\n"
        "    s.trial_config({})\n"
        "heavy = [m for m in ('torch', 'ray', 'optuna', 'sqlalchemy') if m in sys.modules]\n"
        "print(len(specs), heavy)\n"
    )
    n, heavy = _run(code).split(" ", 1)
    assert int(n) >= 5
    assert heavy == "[]"


def test_help_does_not_import_torch() -> None:
    code = ("import sys\nfrom qsearch.cli import main\nrc = main(['--help'])\n"
            "print(rc, 'torch' in sys.modules, 'ray' in sys.modules)")
    assert _run(code).splitlines()[-1] == "0 False False"


def test_driver_imports_ray_tune_only_while_ray_starts() -> None:
    """Importing the driver leaves Ray Tune (about a second) to ``import_tune_side``, which
    the driver runs on its storage thread while Ray starts; that call brings in every module
    ``launch`` then imports, so none of them is imported after Ray is up."""
    code = (
        "import sys\n"
        "import qsearch.search.driver as d\n"
        "before = 'ray.tune' in sys.modules\n"
        "d.import_tune_side()\n"
        "need = ('ray.tune', 'qsearch.search.callback', 'qsearch.search.searcher', "
        "'qsearch.search.stopper', 'qsearch.search.trainable', 'qsearch.search.display', "
        "'qsearch.search.preflight')\n"
        "print(before, [m for m in need if m not in sys.modules])\n"
    )
    assert _run(code).splitlines()[-1] == "False []"


# --------------------------------------------------------------------------- privates

PRIVATE = ("._ot_", "._storage", "._trial_id", "typer._click", "._study_id")


@pytest.mark.parametrize("needle", PRIVATE)
def test_no_private_attributes_of_optuna_ray_or_typer(needle: str) -> None:
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in list(PKG.rglob("*.py"))
            + list((ROOT / "dashboards").rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if needle in line]
    assert hits == []


# --------------------------------------------------------------------------- docs


def test_docs_live_in_the_repo_and_every_citation_resolves() -> None:
    """A user who clones the repo has only the repo: no product file points outside it, and
    every "METHODS.md §N" cited by code or docs is a section of docs/METHODS.md."""
    import re

    sections = set(re.findall(r"^## (\d+)\. ", (ROOT / "docs" / "METHODS.md").read_text(), re.M))
    assert {"1", "2", "3", "4", "5", "6", "7"} <= sections
    files = [p for d in ("qsearch", "dashboards", "studies", "docs", "benchmarks", "docker")
             for p in (ROOT / d).rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".yaml")]
    files.append(ROOT / "README.md")
    outside, unresolved = [], []
    for p in files:
        text = p.read_text(errors="replace")
        if "../shared" in text or "shared/DESIGN.md" in text or "shared/METHODS.md" in text:
            outside.append(str(p.relative_to(ROOT)))
        unresolved += [f"{p.relative_to(ROOT)}: §{n}" for n in
                       re.findall(r"METHODS\.md §(\d+)", text) if n not in sections]
    assert outside == [] and unresolved == []
    for link in re.findall(r"\]\(([^)#:]+)\)", (ROOT / "README.md").read_text()):
        assert (ROOT / link).exists(), link


def test_the_torch_free_catalog_matches_the_registries() -> None:
    """The names a config is validated against without torch are exactly the models and
    datasets the registries build (and a block split is declared where one exists)."""
    code = (
        "from qsearch.config import catalog\n"
        "models = {n: catalog.model_info(n).has_split for n in catalog.model_names()}\n"
        "datasets = catalog.dataset_names()\n"
        "from qsearch.models import list_models, model_entry\n"
        "from qsearch.data import list_datasets\n"
        "assert models == {n: model_entry(n).split is not None for n in list_models()}, models\n"
        "assert datasets == list_datasets(), datasets\n"
        "print('ok')\n"
    )
    assert _run(code) == "ok"


def test_read_only_commands_do_not_import_torch(tmp_path) -> None:
    """``qsearch studies`` and ``qsearch pareto`` on a real store: no torch, Ray or Optuna."""
    url = f"sqlite:///{tmp_path / 'q.db'}"
    _run(f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
         "from _dash_data import write_synthetic_study\n"
         f"write_synthetic_study({url!r}, 'synth', 20)\n")
    code = (
        "import sys\n"
        "from qsearch.cli import main\n"
        f"assert main(['studies', '--storage', {url!r}]) == 0\n"
        f"assert main(['pareto', 'synth', '--storage', {url!r}, '--format', 'json']) == 0\n"
        "print([m for m in ('torch', 'ray', 'optuna') if m in sys.modules])\n"
    )
    assert _run(code).splitlines()[-1] == "[]"


def test_live_table_columns_are_the_studys_objectives_with_what_they_are() -> None:
    """The live table shows the study's own objectives and says what kind each figure is."""
    from rich.console import Console

    from qsearch.search.display import LiveDisplay

    console = Console(width=200, record=True)
    view = LiveDisplay("s", 2, 0, console=console, enabled=False,
                       objectives=["val_accuracy", "backward_flops"])
    view.event("epoch", 0, {"epoch": 1, "val_accuracy": 0.875, "backward_flops": 0.625})
    console.print(view._render())
    text = " ".join(console.export_text().split())  # the caption wraps at the table's width
    assert "0.875" in text and "0.625" in text
    assert "backward_flops: backward FLOPs (x FP32, executed)" in text
    assert "val_accuracy: validation accuracy (top-1, measured)" in text


def test_live_view_pins_progress_with_eta_and_best_and_lists_the_front_in_full() -> None:
    """A short terminal with many trials: the progress bar (elapsed, ETA, best so far) stays
    on screen above the table, and the front's trials are listed with their full params.
    Mutations: the bar after the table (it is cut off at this height); a front that ignores
    dominance or feasibility; params truncated in the front list."""
    from rich.console import Console

    from qsearch.search.display import LiveDisplay

    console = Console(width=120, height=24, record=True)
    view = LiveDisplay("s", 40, 0, console=console, enabled=False,
                       objectives=["val_accuracy", "size_mb"])
    long = {f"layers.stage{i}.conv.w_bits": 2 + i for i in range(8)}
    for n in range(30):  # dominated filler: low accuracy, large
        view.event("start", n, {"params": {"w_bits": 8}})
        view.event("end", n, {"state": "COMPLETE", "val_accuracy": 0.5, "size_mb": 9.0})
    view.event("start", 30, {"params": long})
    view.event("end", 30, {"state": "COMPLETE", "val_accuracy": 0.9, "size_mb": 1.0})
    view.event("start", 31, {"params": {"w_bits": 3}})
    view.event("end", 31, {"state": "COMPLETE", "val_accuracy": 0.8, "size_mb": 0.5})
    view.event("start", 32, {"params": {"w_bits": 1}})  # would dominate, but infeasible
    view.event("end", 32, {"state": "COMPLETE", "val_accuracy": 0.95, "size_mb": 0.1,
                           "feasible": False})
    assert view.front() == [30, 31]
    assert view.best_so_far() == "best val_accuracy 0.9 (#30)"
    console.print(view._render())
    lines = console.export_text().splitlines()
    assert len(lines) <= 24 + 4  # the front may wrap a line or two
    assert "elapsed" in lines[0] and "ETA" in lines[0] and "best val_accuracy 0.9 (#30)" in lines[0]
    text = "\n".join(lines)
    full = ", ".join(f"{k}={v}" for k, v in long.items())
    assert f"#30: {full}" in " ".join(text.split())
    assert "#31: w_bits=3" in text and "#32:" not in text
