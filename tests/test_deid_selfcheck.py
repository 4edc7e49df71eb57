"""The self-check in conformance/deid: medrelay must score 100% on every required action."""

import pytest

from conformance.deid.selfcheck import medrelay_transform, score


def test_basic_profile_scores_100_percent():
    result = score(medrelay_transform())
    assert result.checked > 10000
    assert not result.errors
    assert result.percent == 100.0, "\n".join(map(str, result.misses[:40]))


@pytest.mark.parametrize(
    "options",
    [
        ["retain_uids"],
        ["retain_long_modified_dates", "clean_descriptors"],
        ["retain_long_full_dates", "retain_patient_characteristics", "retain_device_identity",
         "retain_institution_identity"],
        ["clean_structured_content", "clean_graphics", "retain_safe_private"],
    ],
)
def test_options_score_100_percent(options):
    result = score(medrelay_transform(options), files=["CT_small.dcm", "rtplan.dcm"], options=options)
    assert result.percent == 100.0, "\n".join(map(str, result.misses[:40]))


def test_scorer_catches_a_do_nothing_tool():
    result = score(lambda ds: ds, files=["CT_small.dcm"])
    assert result.percent < 10
    assert any(m.name == "PHI sweep" for m in result.misses)


def test_scorer_catches_one_leak():
    base = medrelay_transform()

    def leaky(ds):
        out = base(ds)
        out.PatientName = "PHIDOE^JOHN"
        return out

    result = score(leaky, files=["CT_small.dcm"])
    assert 99 < result.percent < 100
    assert {m.path for m in result.misses} >= {"(0010,0010)"}
