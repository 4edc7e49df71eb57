"""conformance/hl7v2-profile.md states facts the code must keep: checked here so they cannot drift."""

from conftest import ROOT

from engine.hl7.message import CHARSETS
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
