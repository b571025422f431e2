"""The public API type-checks as users call it (mypy --strict, configured in pyproject.toml), and a typo does not."""

import pathlib
import runpy
import subprocess
import sys

import pytest

import mabn

ROOT = pathlib.Path(__file__).resolve().parents[1]
PUBLIC_API = ROOT / "tests" / "typing" / "public_api.py"


def _mypy(*files: pathlib.Path) -> dict[str, list[str]]:
    """mypy's error lines per file name, with the configuration of pyproject.toml (run from the root)."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-pretty", "--no-error-summary", *map(str, files)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 2: mypy itself failed
    errors: dict[str, list[str]] = {pathlib.Path(f).name: [] for f in files}
    for line in result.stdout.splitlines():
        path, _, rest = line.partition(":")
        if ": error: " in rest:
            errors[pathlib.Path(path).name].append(line)
    return errors


@pytest.mark.slow
def test_public_api_type_checks_and_a_wrong_keyword_does_not(tmp_path):
    wrong = tmp_path / "wrong_keyword.py"
    wrong.write_text("import mabn\n\nmabn.MABN2d(64, norm_batchsize=2)\n")
    errors = _mypy(PUBLIC_API, wrong)
    assert errors["public_api.py"] == []
    assert len(errors["wrong_keyword.py"]) == 1
    assert 'Unexpected keyword argument "norm_batchsize" for "MABN2d"' in errors["wrong_keyword.py"][0]


def test_the_public_api_file_runs():
    """What the type checker reads is real code: it runs."""
    namespace = runpy.run_path(str(PUBLIC_API))
    assert namespace["y"].shape == (4, 64, 8, 8) and isinstance(namespace["report"], mabn.FoldReport)
