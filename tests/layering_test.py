"""The layering of kimia_jax, enforced (README "How the code is laid out").

* `lint-imports` (import-linter, contracts in pyproject.toml): each floor imports only floors below
  it; the library never imports tools/, tests/ or experiments/; torch/transformers only in the
  converters of PyTorch files and the tiny .pt writer.
* No library source reads files under tests/: no string literal naming a tests/ or fixtures path,
  and no `Path(__file__).parents[n]` reaching above the package.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "kimia_jax"

FLOORS = [
    "kimia_jax.testing",
    "kimia_jax.inference : kimia_jax.training : (kimia_jax.evaluation) : (kimia_jax.serving)",
    "kimia_jax.audio : kimia_jax.text : kimia_jax.detokenizer",
    "kimia_jax.conversion : kimia_jax.checkpoint",
    "kimia_jax.models",
    "kimia_jax.layers",
    "kimia_jax.sharding",
    "kimia_jax.configs : kimia_jax.errors : kimia_jax.fileio",
]


def _contracts() -> list[dict]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["importlinter"]["contracts"]


def test_contracts_name_every_floor():
    contracts = _contracts()
    layers = [c for c in contracts if c["type"] == "layers"]
    assert len(layers) == 1 and layers[0]["layers"] == FLOORS
    forbidden = {tuple(c["forbidden_modules"]): c for c in contracts if c["type"] == "forbidden"}
    assert forbidden[("tools", "tests", "experiments", "data")]["source_modules"] == ["kimia_jax"]
    assert ("torch", "transformers") in forbidden
    # every package of the library sits on a floor
    on_floors = {
        m.strip(" ()") for floor in FLOORS for m in floor.replace("|", ":").split(":") if m.strip()
    }
    packages = {f"kimia_jax.{p.stem}" for p in PACKAGE.iterdir() if p.suffix == ".py" or (
        p.is_dir() and (p / "__init__.py").is_file())} - {"kimia_jax.__init__"}  # fmt: skip
    assert packages <= on_floors, f"not on a floor: {sorted(packages - on_floors)}"


def test_lint_imports_passes():
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "importlinter.cli"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "broken" not in res.stdout.split("Contracts:")[-1].replace("0 broken", "")


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _test_path_reads(path: Path) -> list[str]:
    """String literals naming tests/ or fixtures paths, and __file__ parents above the package."""
    tree = ast.parse(path.read_text(), str(path))
    docs = _docstrings(tree)
    depth = len(path.relative_to(PACKAGE).parts) - 1  # parents[depth] is kimia_jax/
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            parts = node.value.replace("\\", "/").split("/")
            if "tests" in parts or "fixtures" in parts:
                bad.append(f"{path}:{node.lineno}: {node.value!r}")
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "parents"
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, int)
            and node.slice.value > depth
        ):
            bad.append(f"{path}:{node.lineno}: parents[{node.slice.value}] leaves the package")
    return bad


def test_library_never_reads_under_tests():
    bad = [b for p in sorted(PACKAGE.rglob("*.py")) for b in _test_path_reads(p)]
    assert not bad, "\n".join(bad)


def test_the_path_check_catches_a_fixture_read(monkeypatch):
    """The checker itself: the old tiny_kimia's fixture paths are flagged."""
    f = PACKAGE / "testing" / "_layering_probe.py"
    src = (
        "from pathlib import Path\n"
        "REPO = Path(__file__).resolve().parents[2]\n"
        "X = REPO / 'tests/fixtures/audio/whisper-large-v3'\n"
    )
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: src)
    bad = _test_path_reads(f)
    assert len(bad) == 2, bad
