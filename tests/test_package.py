"""The package's shape: the library imports torch only, the application sits apart, the entry point resolves."""

import importlib
import pathlib
import re
import subprocess
import sys

import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "src" / "mabn"


def test_import_mabn_loads_no_application_module_or_optional_dependency():
    # (tqdm is not checked: torch itself imports it.)
    code = (
        "import sys, mabn, mabn.models; mabn.MABN2d(4); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('matplotlib', 'PIL', 'onnx', 'onnxruntime', 'onnxscript', 'torchvision', 'timm', 'pycocotools') "
        "or m.startswith('mabn.apps')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_library_files_never_import_the_application():
    offenders = []
    for path in LIBRARY.rglob("*.py"):
        if "apps" in path.relative_to(LIBRARY).parts or path.name == "__main__.py":
            continue
        text = path.read_text()
        if re.search(r"^\s*(from\s+(\.+apps|mabn\.apps)|import\s+mabn\.apps)", text, re.MULTILINE):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_console_script_resolves():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["mabn"].partition(":")
    assert callable(getattr(importlib.import_module(module), func))


def test_version_lives_in_one_place():
    """The build reads the version from ``mabn.__version__`` (hatch's dynamic version); pyproject has none."""
    import mabn

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    source = ROOT / pyproject["tool"]["hatch"]["version"]["path"]
    assert source == LIBRARY / "__init__.py"
    # hatch's default pattern: the one assignment to __version__ in that file.
    found = re.findall(r"""^__version__\s*=\s*["']([^"']+)["']""", source.read_text(), re.MULTILINE)
    assert found == [mabn.__version__]
    assert re.fullmatch(r"\d+\.\d+\.\d+", mabn.__version__)


def test_dir_shows_the_public_api_and_the_public_submodules_only():
    import mabn

    submodules = {p.stem for p in LIBRARY.glob("*.py") if not p.stem.startswith("_")}
    submodules |= {p.name for p in LIBRARY.iterdir() if (p / "__init__.py").exists() and not p.name.startswith("_")} - {
        "apps"
    }
    assert set(dir(mabn)) == {"__version__", *mabn.__all__, *submodules}
    assert "monitor" in dir(mabn) and "apps" not in dir(mabn)
    for name in dir(mabn):
        assert getattr(mabn, name) is not None, name  # lazily loaded names and submodules resolve too
    assert isinstance(mabn.serialization, type(mabn))
