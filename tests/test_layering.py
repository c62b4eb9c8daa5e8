"""Import layering of the package, read from the source (no import is executed).

Every ``import`` / ``from ... import`` statement of every module under ``fused_ckpt/`` counts,
wherever it stands (module level, inside a function, under a condition): a function-level
import still makes the two modules depend on each other. Two rules:

* no import cycle among fused_ckpt modules: dependencies run one way;
* the kernel, op and module layers (``fused_ckpt.kernels``, ``.ops``, ``.modules``) never import
  the layers built on top of them: policies, the planner, the command line, the benchmarks, the
  integrations.

An edge goes to the most specific module an import names: ``from .policy import solver`` is an
edge to ``fused_ckpt.policy.solver`` when that file exists, ``from .policy import Policy`` one to
``fused_ckpt.policy``. Parent packages that Python runs first are not edges (every module would
otherwise depend on ``fused_ckpt/__init__.py``, the public API that imports everything).
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = "fused_ckpt"
LOW_LAYERS = ("kernels", "ops", "modules")
HIGH_LAYERS = ("policy", "planner", "cli", "bench", "integrations")


def module_files(root: Path = ROOT) -> dict:
    """{dotted module name: path} of every .py file of the package (``pkg/__init__.py`` -> ``pkg``)."""
    out = {}
    for path in sorted((root / PKG).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_package(name: str, files: dict) -> bool:
    """A package, with or without ``__init__.py`` (``fused_ckpt/ops`` has none)."""
    return any(m.startswith(name + ".") for m in files)


def _resolve_base(module: str, files: dict, level: int, target: str) -> str:
    """Absolute name of ``from <'.' * level><target> import ...`` written in ``module``."""
    if level == 0:
        return target
    pkg = module if files[module].name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(level - 1):
        pkg = pkg.rpartition(".")[0]
    return f"{pkg}.{target}" if target else pkg


def _known(name: str, files: dict):
    """The longest prefix of ``name`` that is a module of the package (or None)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        if cand in files or (cand.startswith(PKG) and _is_package(cand, files)):
            return cand
    return None


def imports_of(module: str, source: str, files: dict) -> set:
    """fused_ckpt modules that ``module`` imports anywhere in ``source``."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_base(module, files, node.level, node.module or "")
            names = []
            for a in node.names:
                sub = f"{base}.{a.name}"
                names.append(sub if _known(sub, files) == sub else base)
        else:
            continue
        for n in names:
            if n == PKG or n.startswith(PKG + "."):
                k = _known(n, files)
                if k is not None and k != module:
                    out.add(k)
    return out


def import_graph(root: Path = ROOT) -> dict:
    files = module_files(root)
    return {m: imports_of(m, p.read_text(), files) for m, p in files.items()}


def cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan), each sorted, in order."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _in_layer(module: str, layers) -> bool:
    return any(module == f"{PKG}.{x}" or module.startswith(f"{PKG}.{x}.") for x in layers)


def upward_imports(graph: dict) -> list:
    return sorted((m, t) for m, deps in graph.items() if _in_layer(m, LOW_LAYERS)
                  for t in deps if _in_layer(t, HIGH_LAYERS))


# ----------------------------------------------------------------------------- the checker itself
def _write(root: Path, files: dict) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_checker_sees_function_level_and_relative_imports(tmp_path):
    """A tiny package with a cycle through a function-level import and an upward import from
    modules/: both are reported; without them the report is empty."""
    bad = _write(tmp_path / "bad", {
        f"{PKG}/__init__.py": "from .modules.block import B\n",
        f"{PKG}/modules/__init__.py": "",
        f"{PKG}/modules/block.py": "class B:\n    def f(self):\n        from ..policy import g\n        return g\n",
        f"{PKG}/policy/__init__.py": "from .wrap import g\n",
        f"{PKG}/policy/wrap.py": f"import {PKG}.modules.block as blk\ndef g():\n    return blk\n",
        f"{PKG}/cli.py": "def main():\n    from . import bench\n",
        f"{PKG}/bench/__init__.py": "from ._main import run\n",
        f"{PKG}/bench/_main.py": "from ..cli import main as run\n",
    })
    g = import_graph(bad)
    assert g[f"{PKG}.modules.block"] == {f"{PKG}.policy"}
    assert g[f"{PKG}.policy.wrap"] == {f"{PKG}.modules.block"}
    assert g[f"{PKG}.cli"] == {f"{PKG}.bench"}
    assert cycles(g) == [[f"{PKG}.bench", f"{PKG}.bench._main", f"{PKG}.cli"],
                         [f"{PKG}.modules.block", f"{PKG}.policy", f"{PKG}.policy.wrap"]]
    assert upward_imports(g) == [(f"{PKG}.modules.block", f"{PKG}.policy")]

    good = _write(tmp_path / "good", {
        f"{PKG}/__init__.py": "from .modules.block import B\n",
        f"{PKG}/modules/__init__.py": "",
        f"{PKG}/modules/block.py": "from ..accounting import g\nclass B:\n    pass\n",
        f"{PKG}/accounting.py": "def g():\n    pass\n",
        f"{PKG}/policy/__init__.py": "from .wrap import g\n",
        f"{PKG}/policy/wrap.py": f"from {PKG}.accounting import g\nimport {PKG}.modules.block\n",
    })
    g = import_graph(good)
    assert g[f"{PKG}.modules.block"] == {f"{PKG}.accounting"}
    assert cycles(g) == [] and upward_imports(g) == []


# ----------------------------------------------------------------------------- the package
@pytest.fixture(scope="module")
def graph():
    g = import_graph()
    assert f"{PKG}.modules.block" in g and f"{PKG}.cli" in g and len(g) > 40  # the real tree was read
    return g


def test_no_import_cycles(graph):
    found = cycles(graph)
    assert not found, "import cycles among fused_ckpt modules (each line one cycle):\n" + "\n".join(
        " <-> ".join(c) for c in found)


# the order fused_ckpt/policy/__init__.py documents: each file imports only files before it
POLICY_ORDER = ("dials", "discovery", "solver", "policies", "wrap", "hf_guard", "report", "apply")


def test_policy_files_import_only_the_files_above_them(graph):
    pkg = f"{PKG}.policy"
    files = sorted(m.rpartition(".")[2] for m in graph if m.startswith(pkg + "."))
    assert files == sorted(POLICY_ORDER), "a policy file is missing from POLICY_ORDER (and the package docstring)"
    wrong = [(f, t) for i, f in enumerate(POLICY_ORDER) for t in sorted(graph[f"{pkg}.{f}"])
             if t == pkg or (t.startswith(pkg + ".") and t.rpartition(".")[2] not in POLICY_ORDER[:i])]
    assert not wrong, f"policy files importing files below them (or the package): {wrong}"


def test_kernels_ops_modules_do_not_import_higher_layers(graph):
    found = upward_imports(graph)
    assert not found, "kernels/ops/modules import a higher layer:\n" + "\n".join(f"{a} -> {b}" for a, b in found)
