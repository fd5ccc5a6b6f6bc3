"""The wheel installs lineguard under its own name and nothing else.

The repository keeps the folders engines/, offline/ and stream/, but an installed lineguard must
not put packages with those generic names into site-packages (any other distribution using one
would break it, or be broken by it). The wheel is built here, its file list is checked, and it is
installed into an empty directory and imported from there, from a directory outside the
repository, so neither the editable install nor the working tree can stand in for it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "engines": "lineguard.engines",
    "offline": "lineguard.offline",
    "stream": "lineguard.stream",
}


def _declared_packages() -> set[str]:
    tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {v: k for k, v in FOLDERS.items()}
    return set(config["packages"])


def test_every_package_folder_is_declared() -> None:
    """A new subpackage left out of pyproject.toml would be missing from the wheel."""
    found = {
        FOLDERS[init.relative_to(ROOT).parts[0]]
        + "".join("." + p for p in init.parent.relative_to(ROOT).parts[1:])
        for folder in FOLDERS
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert found == _declared_packages()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (found,) = out.glob("lineguard-*.whl")
    return found


def test_wheel_holds_only_the_lineguard_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"lineguard", next(t for t in tops if t.endswith(".dist-info"))}, tops
    assert "lineguard/__init__.py" not in names  # a PEP 420 namespace: nothing to collide on
    assert "lineguard/stream/dashboard/static/index.html" in names  # package data travels
    entry = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith("entry_points.txt")))
        .decode()
    )
    assert "lineguard = lineguard.stream.cli:app" in entry
    # every module of the tree is in the wheel
    modules = {str(p.relative_to(ROOT)) for f in FOLDERS for p in (ROOT / f).rglob("*.py")}
    assert {"lineguard/" + m for m in modules} <= set(names)


def test_installed_wheel_imports_and_old_names_do_not(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    installed = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")}
    assert "lineguard" in installed and installed <= {"lineguard", "bin"}, installed
    code = (
        "import importlib.util, sys\n"
        f"sys.path.insert(0, {str(target)!r})\n"
        "import lineguard.stream.cli, lineguard.stream.infer, lineguard.offline.train\n"
        f"assert lineguard.stream.cli.__file__.startswith({str(target)!r}), "
        "lineguard.stream.cli.__file__\n"
        "for old in ('engines', 'offline', 'stream'):\n"
        "    assert importlib.util.find_spec(old) is None, old\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr


def test_source_modules_use_the_namespace() -> None:
    """No module imports the old top-level names (they exist only in a source checkout)."""
    bad = []
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                bad += [
                    f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in FOLDERS
                ]
    assert not bad, bad
