"""The package's shape: layers point one way, no two fmnist modules import each other (lazy
imports inside functions included), the inference path loads no training code, every module
says its concern, and the public API is what the README shows."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fmnist"
# A layer may import the ones to its left, never one to its right (utils and classes: anyone).
LAYERS = ["data", "models", "evaluation", "photos", "inference", "search", "training", "serving", "bench", "cli"]
NOT_FROM = {"inference": {"training", "serving", "bench", "search"}, "serving": {"training", "bench"},
            "photos": {"training", "serving", "bench", "inference", "search"},
            "search": {"training", "serving", "bench"}, "models": {"training", "inference", "serving"},
            "evaluation": {"training", "serving", "bench"}, "data": {"models", "training", "inference", "serving"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def imports_of(path: Path) -> set[str]:
    """The fmnist modules a file imports anywhere in it (absolute imports; `from fmnist.x import
    y` counts fmnist.x.y where that is a module, else fmnist.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import (the package uses absolute imports)")
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "fmnist":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "fmnist")
    return found


def test_no_import_cycles():
    graph = {m: {d for d in imports_of(p) if d in MODULES and d != m} for m, p in MODULES.items()}
    # a package's __init__ re-exporting its own modules is how packages work, not a cycle
    graph = {m: {d for d in deps if not (m.startswith(d + ".") and MODULES[d].name == "__init__.py")}
             for m, deps in graph.items()}

    def cycle_from(start, node, path):
        for nxt in graph[node]:
            if nxt == start:
                return path + [nxt]
            if nxt not in path:
                found = cycle_from(start, nxt, path + [nxt])
                if found:
                    return found
        return None

    cycles = [c for m in graph if (c := cycle_from(m, m, [m]))]
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("layer", sorted(NOT_FROM))
def test_layers_point_one_way(layer):
    bad = []
    for m, p in MODULES.items():
        if m.split(".")[1:2] == [layer]:
            for d in imports_of(p):
                if d.split(".")[1:2] and d.split(".")[1] in NOT_FROM[layer]:
                    bad.append(f"{m} imports {d}")
    assert not bad, "; ".join(bad)


def test_every_module_says_its_concern():
    missing = [m for m, p in MODULES.items() if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"modules without a docstring: {missing}"


def test_inference_path_loads_no_training_code_nor_search_engines():
    """Also: faiss, usearch and pymilvus (with Milvus Lite) are optional (pip install
    'fmnist[search]'): predicting, and serving without --index, never import them, so none needs
    them installed. Nor does evaluating import scikit-learn (a test-only dependency)."""
    code = ("import sys, fmnist, fmnist.inference.predict, fmnist.serving.app, fmnist.inference.export, "
            "fmnist.inference.onnx_backend, fmnist.evaluation.evaluate; fmnist.Predictor; "
            "from fmnist.serving.app import create_app; create_app(); "
            "print(sorted(m for m in sys.modules if m.startswith(('fmnist.training', 'fmnist.bench')) "
            "or m.split('.')[0] in ('faiss', 'usearch', 'pymilvus', 'milvus_lite', 'grpc', 'sklearn')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"importing the inference path loaded {r.stdout.strip()}"


def test_public_api_names_resolve_lazily_and_the_old_predict_path_warns():
    code = ("import sys, warnings, fmnist; light = 'torch' not in sys.modules; "
            "names = [n for n in fmnist.__all__ if n != '__version__' and getattr(fmnist, n) is None]; "
            "warnings.simplefilter('error'); "
            "\ntry:\n import fmnist.predict\nexcept DeprecationWarning as w: print('warned', light, names)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "warned True []"


def test_the_index_layer_loads_without_torch():
    """A process that only opens or measures an index (bench search's memory reading) does not
    pay for torch; the search API's names still resolve, on first use."""
    code = ("import sys; from fmnist.search.index import CatalogueIndex, engine_class; engine_class('faiss').version(); "
            "light = 'torch' not in sys.modules; from fmnist.search import build_index, similar; "
            "print(light, build_index.__module__, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True fmnist.search.catalogue True"
