"""Module structure: no import cycles in the project's packages; the config module is a leaf (no TensorFlow, no
Beam), so configs load anywhere."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("seminar_tf", "beam_pipelines", "serving")


def _modules():
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    found[module[: -len(".__init__")] if module.endswith(".__init__") else module] = path
    return found


def import_graph():
    """module -> the project modules it imports, at module level or inside functions (both count)."""
    modules = _modules()

    def resolve(name):
        while name and name not in modules:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name

    graph = {}
    for module, path in modules.items():
        package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                targets.update(resolve(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level:
                    parts = package.split(".")
                    source = ".".join(parts[: len(parts) - node.level + 1] + ([source] if source else []))
                targets.update(resolve(f"{source}.{alias.name}") or resolve(source) for alias in node.names)
        # importing a module runs its packages' __init__ first: an edge to an enclosing package is not a cycle
        graph[module] = {t for t in targets if t and t != module and not module.startswith(t + ".")}
    return graph


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycles():
    graph = import_graph()
    assert {"seminar_tf.experiment", "seminar_tf.models.builders", "serving.server"} <= set(graph)
    assert "seminar_tf.quantization" in graph["seminar_tf.experiment"]  # the graph sees real edges
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_config_imports_neither_tensorflow_nor_beam():
    code = ("import sys; import seminar_tf.config as c; c.get_preset('movielens'); "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'apache_beam', 'keras', "
            "'tf_keras', 'beam_pipelines', 'numpy')); print(heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_stage_modules_reexport_the_config_classes():
    from beam_pipelines import build_dataset
    from seminar_tf import config, train
    from seminar_tf.data import world

    assert build_dataset.BuildConfig is config.BuildConfig
    assert world.WorldConfig is config.WorldConfig
    assert train.TrainConfig is config.TrainConfig
