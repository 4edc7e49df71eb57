"""The README's quick start, copied and pasted as a new user would, in two shells.

The commands are read from README.md itself (the run command and the walkthrough
block) and run with bash against a fresh copy of the example channels.yaml in a
temporary folder, with no MEDRELAY_* variable set, so a README that drifts from the
code (a port, a token the second shell cannot see, a route that makes no Encounter)
fails here. The only change made to the commands is the ports: each port of
channels.yaml is replaced, in the config and in the commands alike, by a free one, so
the README stays copy-pasteable with its default ports and the test still runs beside
anything else on the machine. The run command's `python3 -m venv` / `pip install` steps
are skipped (the test runs inside that venv; `.venv` is a link to it).

Every walkthrough command must have a check below and every check a command: a command
added to the README without a check, or a check whose command is gone, fails the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from conftest import ROOT, free_port, need_tool

README = ROOT / "README.md"
INSTALL_STEPS = (re.compile(r"^python3 -m venv \.venv$"), re.compile(r"^\.venv/bin/pip install -q -e \.$"))


def sh_blocks(text: str) -> list[tuple[int, str]]:
    """Every ```sh block with the offset where it starts."""
    return [(m.start(), m.group(1)) for m in re.finditer(r"```sh\n(.*?)```", text, re.S)]


def run_command(text: str) -> str:
    quick = text.index("## Quick start")
    blocks = [b for at, b in sh_blocks(text) if at > quick and "medrelay run" in b]
    assert blocks, "README: no ```sh block with `medrelay run` after the Quick start heading"
    return blocks[0].strip()


def walkthrough(text: str) -> list[str]:
    at = text.index("from another shell")
    block = next(b for start, b in sh_blocks(text) if start > at)
    return [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def example_ports(config: str) -> list[int]:
    return sorted({int(p) for p in re.findall(r"\bport:\s*(\d+)", config) + re.findall(r"127\.0\.0\.1:(\d+)", config)})


def substitute(text: str, mapping: dict[int, int]) -> str:
    for old, new in mapping.items():
        text = re.sub(rf"(?<![0-9]){old}(?![0-9])", str(new), text)
    return text


# -- what each walkthrough command must show ---------------------------------------------------
@dataclass
class Step:
    pattern: str  # re.search on the command line
    check: Callable[[subprocess.CompletedProcess, Path], None]
    eventually: bool = False  # the result follows asynchronously (a route, a debounce): may be re-run


def _ok(r: subprocess.CompletedProcess, _: Path) -> None:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"


def _bundle(r: subprocess.CompletedProcess) -> list[dict]:
    _ok(r, Path())
    doc = json.loads(r.stdout)
    assert doc.get("resourceType") == "Bundle", r.stdout[:500]
    return [e["resource"] for e in doc.get("entry", [])]


def _token_exported(r: subprocess.CompletedProcess, work: Path) -> None:
    _ok(r, work)
    token_file = work / "data" / "api-token"
    assert r.stdout == token_file.read_text().strip() and len(r.stdout) >= 32, "the token the engine uses"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600


def _adt_written(r: subprocess.CompletedProcess, work: Path) -> None:
    _ok(r, work)
    assert (work / "adt.hl7").read_bytes().startswith(b"MSH|^~\\&|")


def _aa(r: subprocess.CompletedProcess, work: Path) -> None:
    _ok(r, work)
    assert "MSA|AA|MSG0001" in r.stdout, r.stdout


def _stored(r: subprocess.CompletedProcess, work: Path) -> None:
    _ok(r, work)
    assert "E:" not in r.stderr and "F:" not in r.stderr, r.stderr


def _found(r: subprocess.CompletedProcess, work: Path) -> None:
    _ok(r, work)
    assert "F:" not in r.stderr and "E:" not in r.stderr, r.stderr


def _capability(r: subprocess.CompletedProcess, work: Path) -> None:
    _ok(r, work)
    assert r.stdout.startswith('{"resourceType":"CapabilityStatement"'), r.stdout[:300]


def _patient(r: subprocess.CompletedProcess, _: Path) -> None:
    res = _bundle(r)
    assert any(p.get("name", [{}])[0].get("family") == "DOE" and p["identifier"][0]["value"] == "12345"
               for p in res if p["resourceType"] == "Patient"), res


def _encounter(r: subprocess.CompletedProcess, _: Path) -> None:
    res = _bundle(r)
    enc = [e for e in res if e["resourceType"] == "Encounter"]
    assert enc and enc[0]["identifier"][0]["value"] == "V1001", res
    assert enc[0]["subject"]["reference"].startswith("Patient/")


def _imaging_study(r: subprocess.CompletedProcess, _: Path) -> None:
    res = _bundle(r)
    types = sorted(x["resourceType"] for x in res)
    assert "ImagingStudy" in types and "Patient" in types, types


def _messages(r: subprocess.CompletedProcess, work: Path) -> None:
    _ok(r, work)
    assert "adt-in" in r.stdout and "modality-in" in r.stdout and "api" in r.stdout, r.stdout


def _metrics(r: subprocess.CompletedProcess, work: Path) -> None:
    _ok(r, work)
    assert 'medrelay_messages_acked_total{channel="adt-in"}' in r.stdout, r.stdout[:1000]
    assert 'medrelay_messages_acked_total{channel="modality-in"}' in r.stdout


STEPS = [
    Step(r"^export MEDRELAY_API_TOKEN=", _token_exported),
    Step(r"^printf 'MSH\|.*> adt\.hl7$", _adt_written),
    Step(r"^\.venv/bin/mllp_send .*--file adt\.hl7", _aa),
    Step(r"^echoscu ", _ok),
    Step(r"^storescu ", _stored),
    Step(r"^findscu ", _found),
    Step(r"^curl -s http://127\.0\.0\.1:\d+/fhir/metadata", _capability),
    Step(r"fhir/Patient\?", _patient, eventually=True),
    Step(r"fhir/Encounter\?", _encounter, eventually=True),
    Step(r"fhir/ImagingStudy\?", _imaging_study, eventually=True),
    Step(r"^\.venv/bin/medrelay messages list", _messages),
    Step(r"/metrics \| grep medrelay_", _metrics),
]


def _bash(line: str, work: Path, env: dict[str, str], exports: list[str], timeout: float = 120
          ) -> subprocess.CompletedProcess:
    script = "\n".join([*exports, line])
    if line.startswith("export "):
        name = line.split()[1].split("=", 1)[0]
        script += f'\nprintf %s "${name}"'
    return subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _wait_listening(proc: subprocess.Popen, log: Path, ports: list[int], timeout: float = 90) -> None:
    import socket

    deadline = time.monotonic() + timeout
    pending = list(ports)
    while pending and time.monotonic() < deadline:
        assert proc.poll() is None, f"the README's run command exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            with socket.create_connection(("127.0.0.1", pending[0]), timeout=0.5):
                pending.pop(0)
        except OSError:
            time.sleep(0.1)
    assert not pending, f"ports {pending} not listening:\n{log.read_text()[-3000:]}"


def test_readme_quick_start_works_when_pasted(tmp_path):
    for tool in ("bash", "curl", "/usr/bin/echoscu", "/usr/bin/storescu", "/usr/bin/findscu"):
        need_tool(tool)
    text = README.read_text()
    config = (ROOT / "channels.yaml").read_text()
    ports = example_ports(config)
    assert {2575, 11112, 8080, 9464} <= set(ports), f"README example ports drifted from channels.yaml: {ports}"
    mapping = {p: free_port() for p in ports}
    work = tmp_path / "medrelay"
    work.mkdir()
    (work / "channels.yaml").write_text(substitute(config, mapping))
    (work / ".venv").symlink_to(ROOT / ".venv")

    steps = [s.strip() for s in run_command(text).split("&&")]
    kept = [s for s in steps if not any(p.match(s) for p in INSTALL_STEPS)]
    assert len(steps) - len(kept) == len(INSTALL_STEPS), f"README run command changed shape: {steps}"
    assert kept[-1] == ".venv/bin/medrelay run channels.yaml", kept
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDRELAY_")}
    env["PATH"] = f"/usr/bin:/bin:{env.get('PATH', '')}"
    log = work / "engine.log"
    with open(log, "wb") as out:
        engine = subprocess.Popen(["bash", "-c", substitute(" && ".join(kept), mapping)], cwd=work, env=env,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        listening = [mapping[p] for p in (2575, 11112, 8080, 9464)]
        _wait_listening(engine, log, listening)
        assert "secret.generated" in log.read_text(), "the engine says where it put the token"

        lines = walkthrough(text)
        used: set[int] = set()
        exports: list[str] = []
        for line in lines:
            matching = [i for i, s in enumerate(STEPS) if re.search(s.pattern, line)]
            assert len(matching) == 1, f"README walkthrough command without exactly one check here: {line!r}"
            step = STEPS[matching[0]]
            used.add(matching[0])
            cmd = substitute(line, mapping)
            # a result that follows asynchronously gets 45 s (was 4 tries 2 s apart: a loaded
            # machine could take longer over the 10 s debounce and the routes behind it)
            deadline = time.monotonic() + (45 if step.eventually else 0)
            while True:
                r = _bash(cmd, work, env, exports)
                try:
                    step.check(r, work)
                    break
                except (AssertionError, ValueError) as e:
                    if time.monotonic() >= deadline:
                        raise AssertionError(f"README command failed: {line}\n{e}\nengine log:\n"
                                             f"{log.read_text()[-2500:]}") from None
                    time.sleep(1)
            if line.startswith("export "):
                exports.append(cmd)
        missing = [STEPS[i].pattern for i in range(len(STEPS)) if i not in used]
        assert not missing, f"the README walkthrough lost these steps: {missing}"
    finally:
        if engine.poll() is None:
            os.killpg(engine.pid, signal.SIGTERM)
        try:
            rc = engine.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(engine.pid, signal.SIGKILL)
            raise
    assert rc == 0, f"SIGTERM drains and exits 0; got {rc}:\n{log.read_text()[-2000:]}"
    assert "Traceback" not in log.read_text()


def test_readme_extraction_sees_the_commands():
    """The parser itself: both blocks found, the walkthrough's lines are commands, not comments."""
    text = README.read_text()
    assert "medrelay run channels.yaml" in run_command(text)
    lines = walkthrough(text)
    assert lines[0].startswith("export MEDRELAY_API_TOKEN=") and all(not ln.startswith("#") for ln in lines)


def test_port_substitution_is_consistent():
    mapping = {2575: 40001, 8080: 40002}
    assert substitute("--port 2575 x:8080/fhir 25750 12575 port: 2575", mapping) == \
        "--port 40001 x:40002/fhir 25750 12575 port: 40001"


def test_readme_docker_reads_the_generated_token():
    """The Docker commands (not runnable here) agree with the Dockerfile and the token mechanism."""
    text = README.read_text()
    docker = next(b for _, b in sh_blocks(text) if "docker run" in b)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "MEDRELAY_API_TOKEN=$(openssl" not in docker + dockerfile, "a token made per shell differs per shell"
    assert "docker exec medrelay cat data/api-token" in docker and "--name medrelay" in docker
    assert "/srv/medrelay/data" in docker and re.search(r'^VOLUME \[.*"/srv/medrelay/data"', dockerfile, re.M)
    assert "WORKDIR /srv/medrelay" in dockerfile and "COPY channels.yaml ./" in dockerfile
    assert "${generated:data/api-token}" in (ROOT / "channels.yaml").read_text()


def test_docker_keeps_the_key_file_in_a_named_volume_of_its_own():
    """Issue 10 item 8: a volume for the key file apart from the data. README's docker run names every
    VOLUME: with --rm an unnamed one is removed with the container, and the key file with it."""
    from engine.config import load_settings

    dockerfile = (ROOT / "Dockerfile").read_text()
    volumes = json.loads(re.search(r"^VOLUME (\[.*\])", dockerfile, re.M).group(1))
    assert "/srv/medrelay/keys" in volumes and "/srv/medrelay/data" in volumes
    kek = re.search(r"^ENV MEDRELAY_KEK_FILE=(\S+)", dockerfile, re.M).group(1)
    assert kek.startswith("/srv/medrelay/keys/")
    docker = next(b for _, b in sh_blocks(README.read_text()) if "docker run" in b)
    for volume in volumes:
        assert re.search(rf"-v [\w.-]+:{re.escape(volume)}\b", docker), volume
    env = {"MEDRELAY_KEK_FILE": kek, "MEDRELAY_API_TOKEN": "x"}
    settings = load_settings(ROOT / "channels.yaml", env, need_env=False)
    assert settings.resolve(settings.keys.kek_file) == Path(kek)
    plain = load_settings(ROOT / "channels.yaml", {}, need_env=False)
    assert plain.resolve(plain.keys.kek_file) == ROOT / "data" / "keys.json"  # the README's local run
