"""What `pip install .` installs (the Dockerfile does) carries every data file the code
opens at run time: the console's templates and static files, the FHIR structure and the de-id table.

The dev venv is an editable install, which reads them from the source tree, so only a real build
shows a file left out (found by scripts/container-smoke.sh: a console in the image failed to start).
"""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "listeners", "routes", "transforms")


def test_wheel_has_the_data_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in PACKAGES:  # a copy: setuptools writes build/ and *.egg-info beside the sources
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "lib"
    # build_py is the step of bdist_wheel that picks the package data (the venv has no `wheel`).
    subprocess.run(
        [sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py", "--build-lib", str(out)],
        cwd=src,
        check=True,
        timeout=240,
        capture_output=True,
    )
    names = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    wanted = {
        str(p.relative_to(ROOT))
        for pkg in PACKAGES
        for p in (ROOT / pkg).rglob("*")
        if p.is_file()
        and p.suffix in {".html", ".css", ".js", ".json", ".csv", ".yaml"}
        and "__pycache__" not in p.parts
    }
    assert {
        "engine/console/templates/base.html",
        "engine/console/static/console.css",
        "engine/store/fhir/r4_structure.json",
    } <= wanted
    assert sorted(wanted - names) == []
