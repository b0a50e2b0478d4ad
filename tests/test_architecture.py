"""Structure rules a newcomer can rely on, computed from the source (CONTRIBUTING "Architecture principles"):
no import cycles inside d2norm/ (deferred, function-level imports included: a cycle broken by a deferred import
is still two modules that each need the other), no Python file over 600 lines, a README that is an entry page,
and the generated option reference in step with the declarations."""
import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "d2norm")


def _modules():
    mods = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                mods[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return mods


def import_graph(mods):
    """module -> d2norm modules it imports anywhere in its body (``from X import name`` counts X.name when that
    is a module, else X)."""
    edges = {m: set() for m in mods}
    for m, path in mods.items():
        package = m.split(".") if path.endswith("__init__.py") else m.split(".")[:-1]
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                edges[m].update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for a in node.names:
                    if f"{target}.{a.name}" in mods:
                        edges[m].add(f"{target}.{a.name}")
                    elif target in mods:
                        edges[m].add(target)
    return edges


def cycles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_inside_d2norm():
    found = cycles(import_graph(_modules()))
    assert not found, f"import cycles (module -> module, deferred imports included): {found}"


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_python_file_over_600_lines():
    too_long = {}
    for folder in ("d2norm", "tools"):
        for d, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith(".py"):
                    n = sum(1 for _ in open(os.path.join(d, f)))
                    if n > 600:
                        too_long[os.path.relpath(os.path.join(d, f), ROOT)] = n
    assert not too_long, too_long


def test_readme_is_an_entry_page_and_its_links_exist():
    text = open(os.path.join(ROOT, "README.md")).read()
    assert len(text.splitlines()) <= 300
    assert "make demo" in text and "make test" in text
    import re

    for link in re.findall(r"\]\(((?:docs/|CONTRIBUTING)[^)#]*)\)", text):
        assert os.path.exists(os.path.join(ROOT, link)), link


def test_config_reference_is_generated_from_the_declarations():
    from d2norm.options import markdown_reference

    text = open(os.path.join(ROOT, "docs", "config.md")).read()
    assert text == markdown_reference() + "\n", "run: python tools/config_reference.py --write docs/config.md"


def test_config_py_declares_no_option():
    """Every D2NORM key comes from a declaration next to the code that reads it; config.py only assembles."""
    from detectron2.config import get_cfg

    from d2norm.config import add_d2norm_config
    from d2norm.options import declared_nodes

    source = open(os.path.join(PKG, "config.py")).read()
    cfg = add_d2norm_config(get_cfg())
    declared = {(n.name, o.key) for n in declared_nodes() for o in n.options}
    keys = {(node, key) for node, sub in cfg.D2NORM.items() for key in sub}
    assert keys == declared
    assert "_C.D2NORM." not in source and ".MOMENTUM = " not in source


@pytest.mark.parametrize("cls_name", ["GhostBatchNorm2d", "MABN2d", "EvalNorm2d", "BatchGroupNorm", "DomainBatchNorm2d"])
def test_constructor_defaults_and_from_config_are_the_declared_ones(cls_name):
    import inspect

    from detectron2.config import get_cfg

    import d2norm.layers as L
    from d2norm.config import add_d2norm_config
    from d2norm.options import class_options

    cls = getattr(L, cls_name)
    sig = inspect.signature(cls.__init__)
    kwargs = cls.from_config(add_d2norm_config(get_cfg()), 32)
    for arg, (node, o) in class_options(cls).items():
        if o.arg is None:
            continue
        assert sig.parameters[arg].default == o.default == kwargs[arg], (arg, node)
