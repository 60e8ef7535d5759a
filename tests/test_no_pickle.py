"""No pickle anywhere: loading a pickled file runs whatever code its author put in it.

Models travel as ONNX, checkpoints as safetensors or state dicts loaded with weights_only=True.
The scan reads every Python file of the repository as a syntax tree (strings and comments do not
count), so a new `torch.load(path)` or `import pickle` fails this test wherever it is added.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PICKLE_MODULES = frozenset({"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"})
PICKLE_CALLS = frozenset({"read_pickle", "to_pickle"})  # pandas
PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".joblib"})
SKIPPED_FOLDERS = frozenset({"build", "dist", "leukoedge-out", "__pycache__", "node_modules"})


def _dotted(node: ast.expr) -> str | None:
    """'torch.serialization.load' for the expression torch.serialization.load; None for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        parent = _dotted(node.value)
        return None if parent is None else f"{parent}.{node.attr}"
    return None


MISSING, UNKNOWN = object(), object()


def _passed(call: ast.Call, name: str) -> object:
    """The constant a call passes as name=...; MISSING when absent, UNKNOWN when not provable (a variable, **kwargs)."""
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else UNKNOWN
    return UNKNOWN if any(keyword.arg is None for keyword in call.keywords) else MISSING


def pickle_uses(source: str, filename: str = "<source>") -> list[str]:
    """Every place in Python source that imports a pickle module or may unpickle: line and what."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> module or function it stands for, from every import in the file
    findings = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLE_MODULES:
                    findings.append(f"line {node.lineno}: import {alias.name}")
                aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLE_MODULES:
                findings.append(f"line {node.lineno}: from {node.module} import ...")
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        written = _dotted(node.func)
        if written is None:
            if isinstance(node.func, ast.Attribute) and node.func.attr in PICKLE_CALLS:
                findings.append(f"line {node.lineno}: .{node.func.attr}(...)")
            continue
        head, _, rest = written.partition(".")
        called = aliases.get(head, head) + (f".{rest}" if rest else "")
        if called in ("torch.load", "torch.serialization.load") and _passed(node, "weights_only") is not True:
            findings.append(f"line {node.lineno}: {written}(...) without weights_only=True")
        elif called == "numpy.load" and _passed(node, "allow_pickle") not in (MISSING, False):
            findings.append(f"line {node.lineno}: {written}(...) with allow_pickle")
        elif called.rsplit(".", 1)[-1] in PICKLE_CALLS:
            findings.append(f"line {node.lineno}: {written}(...)")
    return findings


def _repository_files(root: Path) -> list[Path]:
    """Every file under root, skipping hidden folders (.git, .venv), build outputs and egg-info."""
    found = []
    for path in sorted(root.rglob("*")):
        parts = path.relative_to(root).parts
        if any(part.startswith(".") or part in SKIPPED_FOLDERS or part.endswith(".egg-info") for part in parts[:-1]):
            continue
        if path.is_file():
            found.append(path)
    return found


def scan(root: Path) -> list[str]:
    """Pickle uses in every Python file under root, and pickled files lying there."""
    findings = []
    for path in _repository_files(root):
        where = path.relative_to(root)
        if path.suffix in PICKLE_SUFFIXES:
            findings.append(f"{where}: a pickle file")
        elif path.suffix == ".py":
            findings += [f"{where} {finding}" for finding in pickle_uses(path.read_text(encoding="utf-8"), str(path))]
    return findings


@pytest.mark.parametrize(
    "source",
    [
        "import torch\nstate = torch.load(path)",
        "import torch\nstate = torch.load(path, map_location='cpu', weights_only=False)",
        "import torch as T\nstate = T.load(path, map_location='cpu')",
        "from torch import load\nstate = load(path)",
        "from torch import load as restore\nstate = restore(path)",
        "def restore(path, **options):\n    import torch\n    return torch.load(path, **options)",
        "import torch\nstate = torch.serialization.load(path)",
        "import pickle",
        "from pickle import loads",
        "import joblib",
        "import dill as serializer",
        "import numpy as np\ncells = np.load(path, allow_pickle=True)",
        "import numpy\ncells = numpy.load(path, **options)",
        "import pandas as pd\ntable = pd.read_pickle(path)",
    ],
)
def test_scan_flags_every_way_to_unpickle(source: str):
    assert pickle_uses(source), f"not flagged: {source!r}"


@pytest.mark.parametrize(
    "source",
    [
        "import torch\nstate = torch.load(path, map_location='cpu', weights_only=True)",
        "import numpy as np\nfield = np.load(path)",
        "import numpy as np\nfield = np.load(path, allow_pickle=False)",
        "import onnx\nmodel = onnx.load(path)",
        "import json\nmanifest = json.load(stream)",
        "note = 'torch.load(path) and import pickle are refused'  # torch.load(path)",
    ],
)
def test_scan_passes_safe_loading(source: str):
    assert pickle_uses(source) == []


def test_scan_finds_a_pickle_use_added_anywhere_in_a_tree(tmp_path: Path):
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "resume.py").write_text("import torch\n\ndef resume(path):\n    return torch.load(path)\n")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "scaler.pkl").write_bytes(b"\x80\x04N.")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "hook.py").write_text("import pickle\n")

    assert scan(tmp_path) == [
        "models/scaler.pkl: a pickle file",
        "training/resume.py line 4: torch.load(...) without weights_only=True",
    ]


def test_repository_has_no_pickle():
    assert scan(REPO_ROOT) == []
