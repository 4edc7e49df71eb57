"""conformance/hl7v2-profile.md states facts the code must keep: checked here so they cannot drift."""

from conftest import ROOT

from engine.hl7.message import CHARSETS, HL7_VERSIONS
from listeners.mllp import MLLPSourceConfig

PROFILE = (ROOT / "conformance" / "hl7v2-profile.md").read_text()


def test_charsets_listed_are_the_ones_accepted():
    section = PROFILE.split("## Character sets", 1)[1].split("##", 1)[0]
    for name in CHARSETS:
        if name.startswith("8859/"):
            n = int(name.split("/")[1])
            assert ("8859/1` … `8859/9" in section and 1 <= n <= 9) or f"`{name}`" in section, name
        else:
            assert f"`{name}`" in section, name


def test_defaults_stated_are_the_defaults():
    defaults = MLLPSourceConfig(type="mllp")
    assert defaults.max_frame_bytes == 10 * 1024 * 1024 and "**10 MiB**" in PROFILE
    assert defaults.idle_timeout == 300 and "**300 s**" in PROFILE
    assert defaults.host == "127.0.0.1" and defaults.port == 2575 and "`127.0.0.1:2575`" in PROFILE


def test_connection_limits_stated_are_the_defaults():
    defaults = MLLPSourceConfig(type="mllp")
    assert defaults.frame_timeout == 60 and "`frame_timeout` default **60 s**" in PROFILE
    assert defaults.max_connections == 256 and "`max_connections`\n  default **256**" in PROFILE


def test_validation_limits_stated_are_the_defaults():
    v = MLLPSourceConfig(type="mllp").validation
    table = PROFILE.split("Validation work is bounded", 1)[1].split("\n\n", 2)[1]
    rows = {line.split("|")[1].strip().split(" ")[0].strip("`"): line.split("|")[2].strip()
            for line in table.splitlines()[2:]}
    assert v.max_bytes == 1024 * 1024 and rows["max_bytes"] == "**1 MiB**"
    assert rows["max_segments"] == f"**{v.max_segments}**"
    assert rows["max_repetitions"] == f"**{v.max_repetitions}**"
    assert rows["timeout"] == f"**{v.timeout:g} s**"
    assert rows["workers"] == f"**{v.workers}**" and rows["memory_mb"] == f"**{v.memory_mb}**"


def test_versions_listed_are_the_ones_accepted():
    section = PROFILE.split("## Versions", 1)[1].split("##", 1)[0]
    listed = section.split("must be an HL7 v2 version:", 1)[1].split("(", 1)[0]
    assert [v.strip(" `\n") for v in listed.split(",")] == list(HL7_VERSIONS)


def test_samples_are_where_the_profile_says():
    assert "`conformance/hl7v2-samples/`" in PROFILE
    assert len(list((ROOT / "conformance" / "hl7v2-samples").glob("*.hl7"))) >= 50
