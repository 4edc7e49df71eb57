"""De-identification throughput and conformance: medrelay next to dicognito and pydicom `deid`.

Same process, same inputs: pydicom's test files with synthetic PHI injected into
every Table E.1-1 attribute (the self-check's injection), deep-copied before the
clock starts so every tool gets a fresh Dataset. Each tool is timed for at most
TIME_LIMIT seconds or MAX_INSTANCES instances, then scored by the self-check
(``conformance.deid.selfcheck.score``) on the basic profile.

Run: ``.venv/bin/python bench/deid.py`` (needs the ``bench`` extra: dicognito, deid).
"""

from __future__ import annotations

import copy
import io
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("MESSAGELEVEL", "0")  # pydicom-deid's logger: quiet
# This file is bench/deid.py: drop its folder from the path so `import deid` finds pydicom-deid.
_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))

import pydicom  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402

from conformance.deid.selfcheck import DEFAULT_FILES, TEST_FILES, inject, medrelay_transform, score  # noqa: E402

MAX_INSTANCES = 400
TIME_LIMIT = 8.0
Tool = Callable[[Dataset], Dataset]


def medrelay_in_memory() -> Tool:
    from transforms.deid_config import DeidentifyConfig
    from transforms.deid_dicom import DicomDeidentifier
    from transforms.deid_pseudonym import Pseudonymizer

    config = DeidentifyConfig(type="deidentify")
    pseudo = Pseudonymizer(b"bench-secret" * 3)

    def run(ds: Dataset) -> Dataset:
        return DicomDeidentifier(config, pseudo).apply(ds)

    return run


def dicognito_tool() -> Tool | None:
    try:
        from dicognito.anonymizer import Anonymizer
    except ImportError:
        return None
    anonymizer = Anonymizer(seed="bench")

    def run(ds: Dataset) -> Dataset:
        anonymizer.anonymize(ds)
        return ds

    return run


def deid_tool() -> Tool | None:
    try:
        from deid.config import DeidRecipe
        from deid.dicom import replace_identifiers
    except ImportError:
        return None
    recipe = DeidRecipe()  # the package's default recipe (deid.dicom)

    def run(ds: Dataset) -> Dataset:
        return replace_identifiers(dicom_files=[ds], deid=recipe, save=False, remove_private=True)[0]

    return run


def inputs() -> list[Dataset]:
    out = []
    for name in DEFAULT_FILES:
        ds = pydicom.dcmread(TEST_FILES / name)
        inject(ds, 1, frozenset())
        buf = io.BytesIO()  # normalise through bytes so every tool sees a freshly parsed data set
        ds.save_as(buf, enforce_file_format=True)
        out.append(pydicom.dcmread(io.BytesIO(buf.getvalue())))
    return out


def throughput(tool: Tool, data: list[Dataset]) -> tuple[float, int]:
    copies = [copy.deepcopy(data[i % len(data)]) for i in range(MAX_INSTANCES)]
    done = 0
    start = time.perf_counter()
    for ds in copies:
        tool(ds)
        done += 1
        if time.perf_counter() - start > TIME_LIMIT:
            break
    elapsed = time.perf_counter() - start
    return done / elapsed, done


def main() -> int:
    warnings.simplefilter("ignore")
    data = inputs()
    tools: dict[str, Tool | None] = {
        "medrelay (bytes in/out, as in the engine)": medrelay_transform(),
        "medrelay (in-memory Dataset)": medrelay_in_memory(),
        "dicognito": dicognito_tool(),
        "pydicom deid (default recipe)": deid_tool(),
    }
    print(f"{len(DEFAULT_FILES)} files, PHI injected into every Table E.1-1 attribute; "
          f"up to {MAX_INSTANCES} instances or {TIME_LIMIT:.0f} s per tool")
    print(f"{'tool':44} {'inst/s':>9} {'n':>5}  self-check (basic profile)")
    for name, tool in tools.items():
        if tool is None:
            print(f"{name:44} {'not installed':>16}")
            continue
        rate, n = throughput(tool, data)
        result = score(tool)
        print(f"{name:44} {rate:9.1f} {n:5d}  {result.summary()}")
        if result.errors:
            print(f"{'':44} errors: {len(result.errors)}, first: {result.errors[0][:100]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
