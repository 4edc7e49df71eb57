"""The committed DICOM conformance statement is what the generator makes from the code today."""

from __future__ import annotations

from conformance.gen_dicom_statement import OUT, render


def test_statement_matches_code():
    assert OUT.read_text() == render(), (
        "conformance/dicom-conformance-statement.md is stale: run "
        ".venv/bin/python conformance/gen_dicom_statement.py and commit the result")


def test_statement_names_every_status_and_syntax():
    from listeners.dicom_contexts import STORAGE_TRANSFER_SYNTAXES
    from listeners.dicom_status import TABLES

    text = render()
    for uid in STORAGE_TRANSFER_SYNTAXES:
        assert f"`{uid}`" in text
    for table in TABLES.values():
        for status in table.values():
            assert f"0x{status.code:04X}" in text
