#!/usr/bin/env bash
# Manual check that the Dockerfile builds from a clean checkout and runs the example channels.yaml:
# health, MLLP ADT -> AA, C-ECHO, FHIR metadata and an authenticated read, the image's HEALTHCHECK,
# a SIGTERM drain that exits 0, and data, token and key file surviving a restart on the same named
# volumes. Not part of .ci/run or pytest: it builds an image (minutes) and needs podman.
#
#   scripts/container-smoke.sh              # build HEAD, run every check, remove what it made
#   SMOKE_KEEP=1 scripts/container-smoke.sh # keep the container's volumes afterwards
#
# Without registry access (this project's build machine) the base image can be replaced by a local
# stand-in: SMOKE_STANDIN=1 (or automatically when the pull fails) debootstraps Debian bookworm with
# its python3.11 and imports it as docker.io/library/python:3.11-slim-bookworm, so the Dockerfile
# builds unmodified. Needs root and debootstrap. How it differs from the official image:
# docs/notes/container-smoke.md.
#
# Environment: CONTAINER_ENGINE (podman; docker untested: it has no `healthcheck run`),
# SMOKE_NAME (medrelay-smoke: container and volume prefix), SMOKE_IMAGE (medrelay),
# SMOKE_NETWORK (build/run network, e.g. host; default: the engine's), SMOKE_PIP_CONF (a pip.conf
# mounted at /etc/pip.conf during the build, e.g. for a pip index or a proxy's CA; it leaves an
# empty /etc/pip.conf mount point in the image), SMOKE_WORK (/tmp/medrelay-smoke: logs).
# The script first starts a trivial container and, where the defaults cannot (RLIMIT_* above this
# host's hard limits, crun on hybrid cgroups), retries with --ulimit at the host's limits, then
# with --runtime runc; it prints the options it uses.
# Exit 0 when every check passed, 1 at the first failed check (it says which).
set -euo pipefail

ENGINE=${CONTAINER_ENGINE:-podman}
NAME=${SMOKE_NAME:-medrelay-smoke}
IMAGE=${SMOKE_IMAGE:-medrelay}
WORK=${SMOKE_WORK:-/tmp/medrelay-smoke}
BASE=docker.io/library/python:3.11-slim-bookworm
REPO=$(cd "$(dirname "$0")/.." && pwd)
NET=()
[ -n "${SMOKE_NETWORK:-}" ] && NET=(--network "$SMOKE_NETWORK")
VOLS=(-v "$NAME-data:/srv/medrelay/data" -v "$NAME-keys:/srv/medrelay/keys" -v "$NAME-outbox:/srv/medrelay/outbox")
PORTS=(-p 127.0.0.1:2575:2575 -p 127.0.0.1:11112:11112 -p 127.0.0.1:8080:8080 -p 127.0.0.1:9464:9464)
if [ "${SMOKE_NETWORK:-}" = host ]; then PORTS=(); fi   # host network: the ports are the host's
CHECKS=0
G=()   # global engine options (--runtime runc where crun cannot run here)
R=()   # run/build options (--ulimit where the defaults exceed this host's hard limits)

say() { printf '%s\n' "$*"; }
ok() { CHECKS=$((CHECKS + 1)); say "ok   $*"; }
fail() {
    say "FAIL $*"
    if "$ENGINE" "${G[@]}" container exists "$NAME" 2>/dev/null; then
        say "---- last container log lines"; "$ENGINE" "${G[@]}" logs --tail 30 "$NAME" 2>&1 || true
        say "---- container $NAME left for inspection (the next run removes it)"
    fi
    exit 1
}
# wait_for SECONDS DESCRIPTION COMMAND...: retry COMMAND every second until it succeeds.
wait_for() {
    local limit=$1 what=$2 t0=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        [ $((SECONDS - t0)) -ge "$limit" ] && fail "$what (not within ${limit}s)"
        sleep 1
    done
    ok "$what ($((SECONDS - t0))s)"
}
cleanup_container() { "$ENGINE" "${G[@]}" rm -f -t 5 "$NAME" >/dev/null 2>&1 || true; }
cleanup_volumes() { "$ENGINE" "${G[@]}" volume rm -f "$NAME-data" "$NAME-keys" "$NAME-outbox" >/dev/null 2>&1 || true; }

# --- base image: the official one, or a debootstrapped stand-in ---------------------------------
make_standin() {
    command -v debootstrap >/dev/null || fail "no $BASE and no debootstrap to make a stand-in"
    local root=$WORK/rootfs
    rm -rf "$root"
    say "building a stand-in for $BASE with debootstrap (a few minutes)"
    debootstrap --variant=minbase --include=python3.11,python3-pip,python3-venv,ca-certificates \
        bookworm "$root" "${SMOKE_DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$WORK/debootstrap.log" 2>&1 \
        || fail "debootstrap (see $WORK/debootstrap.log)"
    # As in the official image: `python` and `pip` on PATH, pip installs system-wide (PEP 668
    # marker removed), no apt lists.
    rm -f "$root/usr/lib/python3.11/EXTERNALLY-MANAGED"
    ln -sf python3.11 "$root/usr/bin/python"
    [ -e "$root/usr/bin/pip" ] || ln -sf pip3 "$root/usr/bin/pip"
    rm -rf "$root/var/lib/apt/lists/"* "$root/var/cache/apt/"*.bin
    # This host's CA bundle (a TLS-inspecting proxy's CA may be in it) and a pip.conf naming it, so
    # pip uses it whichever certifi it finds (the build installs PyPI's certifi into /usr/local).
    # Baked into the stand-in, not mounted into the build: a mount point stays in the image.
    if [ -r /etc/ssl/certs/ca-certificates.crt ]; then
        cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
        printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
    fi
    tar -C "$root" -c . | "$ENGINE" "${G[@]}" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE" >"$WORK/import.log" 2>&1 \
        || fail "import of the stand-in"
    rm -rf "$root"
    ok "stand-in base image $BASE (Debian bookworm python3.11, see docs/notes/container-smoke.md)"
}

mkdir -p "$WORK"
say "== base image"
if "$ENGINE" "${G[@]}" image exists "$BASE" 2>/dev/null || "$ENGINE" "${G[@]}" image inspect "$BASE" >/dev/null 2>&1; then
    ok "base image $BASE present ($("$ENGINE" "${G[@]}" image inspect --format '{{.Id}}' "$BASE" | cut -c1-12))"
elif [ "${SMOKE_STANDIN:-}" != 1 ] && timeout 120 "$ENGINE" "${G[@]}" pull -q "$BASE" >/dev/null 2>&1; then
    ok "pulled $BASE"
else
    say "no $BASE here and no pull (SMOKE_STANDIN=${SMOKE_STANDIN:-0})"
    make_standin
fi

# --- can this host start a container, and with which options? ----------------------------------
say "== container runtime"
probe() { "$ENGINE" "${G[@]}" run --rm "${NET[@]}" "${R[@]}" "$BASE" true >"$WORK/probe.log" 2>&1; }
if ! probe; then
    say "defaults cannot start a container: $(grep -v systemd "$WORK/probe.log" | tail -1)"
    R=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=8192:8192)
    if ! probe && command -v runc >/dev/null && [ "$ENGINE" = podman ]; then
        say "with ulimits: $(grep -v systemd "$WORK/probe.log" | tail -1)"
        G=(--runtime runc)
        probe || fail "no container starts, even with ${G[*]} ${R[*]}: $(tail -1 "$WORK/probe.log")"
    fi
fi
ok "a container starts with options: ${G[*]:-(none)} ${R[*]:-}"

# --- build from a clean copy of HEAD -------------------------------------------------------------
say "== build"
rm -rf "$WORK/src" && mkdir -p "$WORK/src"
git -C "$REPO" archive HEAD | tar -x -C "$WORK/src"
say "source: $(git -C "$REPO" rev-parse --short HEAD) (committed files only)"
B=()
[ "$ENGINE" = podman ] && B=(--format docker)   # the OCI format has no HEALTHCHECK
[ -n "${SMOKE_PIP_CONF:-}" ] && B+=(--volume "$SMOKE_PIP_CONF:/etc/pip.conf:ro")
t0=$SECONDS
"$ENGINE" "${G[@]}" build "${NET[@]}" "${R[@]}" "${B[@]}" -t "$IMAGE" "$WORK/src" >"$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log"; fail "build (log: $WORK/build.log)"; }
ok "build $IMAGE from the unmodified Dockerfile ($((SECONDS - t0))s, log $WORK/build.log)"
hc=$("$ENGINE" "${G[@]}" image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE")
case $hc in *healthz*) ok "the image carries the HEALTHCHECK";; *) fail "no HEALTHCHECK in the image: $hc";; esac
# What `medrelay` imports is the installed copy (the source copy in /srv/medrelay is only on
# sys.path for `python` started there): it must carry the console's templates and static files.
"$ENGINE" "${G[@]}" run --rm "${NET[@]}" "${R[@]}" --workdir / --entrypoint python "$IMAGE" -c '
import pathlib, sys, engine.console as c
d = pathlib.Path(c.__file__).parent
missing = [p for p in ("static/console.css", "static/console.js", "templates/base.html") if not (d / p).is_file()]
print(d, missing); sys.exit(bool(missing) or "/usr/local/" not in str(d))' >"$WORK/assets.log" 2>&1 \
    || fail "installed package lacks console files: $(grep -v systemd "$WORK/assets.log")"
ok "the installed engine package has the console's templates and static files"

# --- first run --------------------------------------------------------------------------------
say "== first run (fresh volumes $NAME-data, $NAME-keys, $NAME-outbox)"
cleanup_container
cleanup_volumes
# As the Dockerfile's comment, ports published on 127.0.0.1 only; no --rm, so the exit code of the
# drain can be read (the container is removed by this script).
run_container() {
    "$ENGINE" "${G[@]}" run -d --name "$NAME" "${NET[@]}" "${R[@]}" "${PORTS[@]}" -e MEDRELAY_BIND=0.0.0.0 \
        "${VOLS[@]}" "$IMAGE" >"$WORK/run.log" 2>&1 \
        || fail "run $IMAGE: $(grep -v systemd "$WORK/run.log" | tail -2)"
}
run_container
http_status() { curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$@"; }
healthz_ok() { [ "$(http_status http://127.0.0.1:9464/healthz)" = 200 ]; }
ready_ok() { [ "$(http_status http://127.0.0.1:9464/readyz)" = 200 ]; }
wait_for 60 "GET :9464/healthz 200" healthz_ok
if [ ${#PORTS[@]} -gt 0 ]; then
    published=$("$ENGINE" "${G[@]}" port "$NAME")
    [ "$(grep -c -- '-> 127.0.0.1:' <<<"$published")" = 4 ] && ! grep -q -v -- '-> 127.0.0.1:' <<<"$published" \
        || fail "ports not all published on 127.0.0.1 only: $published"
    ok "4 ports published, on 127.0.0.1 only"
fi
wait_for 60 "GET :9464/readyz 200 (every listener bound, every worker running)" ready_ok

CONTROL_ID="SMOKE$(date +%s)"
# A raw-socket MLLP client (no medrelay code): frame <VT> msg <FS><CR>, read one framed reply.
mllp_ack() {
    python3 - "$CONTROL_ID" <<'EOF'
import socket, sys
cid = sys.argv[1]
msg = "\r".join([
    f"MSH|^~\\&|HIS|HOSP|RIS|RAD|20240102030405||ADT^A01^ADT_A01|{cid}|P|2.5",
    "EVN|A01|20240102030405", "PID|1||SMK4711^^^HOSP^MR||SMOKE^TEST||19800101|M", "PV1|1|I|W^389^1"]) + "\r"
with socket.create_connection(("127.0.0.1", 2575), timeout=10) as s:
    s.sendall(b"\x0b" + msg.encode() + b"\x1c\r")
    buf = b""
    while b"\x1c\r" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
reply = buf.strip(b"\x0b\x1c\r").decode("latin-1")
msa = [seg.split("|") for seg in reply.split("\r") if seg.startswith("MSA")]
print(reply.replace("\r", "\n"))
sys.exit(0 if msa and msa[0][1] == "AA" and msa[0][2] == cid else 1)
EOF
}
ack=$(mllp_ack) || fail "ADT^A01 over MLLP :2575 not acknowledged AA: $ack"
ok "ADT^A01 $CONTROL_ID over MLLP :2575 -> MSA|AA"
echoscu -aet ECHOSCU -aec MEDRELAY -to 10 127.0.0.1 11112 >"$WORK/echoscu.log" 2>&1 \
    || fail "echoscu :11112 ($(cat "$WORK/echoscu.log"))"
ok "C-ECHO (DCMTK echoscu) :11112"
[ "$(http_status http://127.0.0.1:8080/fhir/metadata)" = 200 ] || fail "GET :8080/fhir/metadata not 200"
ok "GET :8080/fhir/metadata 200 (no token)"
[ "$(http_status http://127.0.0.1:8080/fhir/Patient)" = 401 ] || fail "GET /fhir/Patient without a token not 401"
ok "GET :8080/fhir/Patient without a token 401"
TOKEN=$("$ENGINE" "${G[@]}" exec "$NAME" cat data/api-token) || fail "exec cat data/api-token"
[ -n "$TOKEN" ] || fail "data/api-token empty"
ok "token read with exec cat data/api-token"
patient_there() {
    curl -sf --max-time 5 -H "Authorization: Bearer $TOKEN" \
        'http://127.0.0.1:8080/fhir/Patient?identifier=SMK4711' | grep -q '"family": *"SMOKE"'
}
wait_for 30 "the ADT's Patient SMK4711 at GET /fhir/Patient?identifier=SMK4711 with the token" patient_there
listed() { "$ENGINE" "${G[@]}" exec "$NAME" medrelay messages list --control-id "$CONTROL_ID" | grep -q adt-in; }
wait_for 10 "medrelay messages list --control-id $CONTROL_ID lists it (channel adt-in)" listed
keyfile=$("$ENGINE" "${G[@]}" exec "$NAME" stat -c '%a %U' keys/keys.json) || fail "no keys/keys.json in the key volume"
[ "$keyfile" = "600 medrelay" ] || fail "keys/keys.json is '$keyfile', want '600 medrelay'"
ok "keys/keys.json in the key volume: mode 600, owner medrelay"
"$ENGINE" "${G[@]}" exec "$NAME" test ! -e data/keys.json || fail "a key file in the data volume"
ok "no key file in the data volume"
"$ENGINE" "${G[@]}" healthcheck run "$NAME" >/dev/null || fail "podman healthcheck run: unhealthy"
health=$("$ENGINE" "${G[@]}" inspect --format '{{.State.Health.Status}}' "$NAME" 2>/dev/null \
    || "$ENGINE" "${G[@]}" inspect --format '{{.State.Healthcheck.Status}}' "$NAME")
[ "$health" = healthy ] || fail "inspect health status '$health'"
ok "image HEALTHCHECK: healthcheck run passes, inspect says $health"

# --- drain ------------------------------------------------------------------------------------
say "== stop (SIGTERM)"
t0=$SECONDS
"$ENGINE" "${G[@]}" stop -t 30 "$NAME" >"$WORK/stop.log" 2>&1 || fail "stop ($(cat "$WORK/stop.log"))"
took=$((SECONDS - t0))
code=$("$ENGINE" "${G[@]}" inspect --format '{{.State.ExitCode}}' "$NAME")
[ "$code" = 0 ] || fail "exit code $code after SIGTERM"
[ "$took" -lt 15 ] || fail "stop took ${took}s (SIGKILL after 30s, or a slow drain)"
ok "stop: SIGTERM drained, exit code 0 in ${took}s"
logs=$("$ENGINE" "${G[@]}" logs "$NAME" 2>&1)
grep -q '"engine.draining"' <<<"$logs" && grep -q '"engine.stopped"' <<<"$logs" \
    || fail "no engine.draining / engine.stopped event in the log"
ok "the log has engine.draining then engine.stopped"
cleanup_container

# --- restart on the same volumes --------------------------------------------------------------
say "== second run (same volumes)"
run_container
wait_for 60 "GET :9464/healthz 200 after the restart" healthz_ok
TOKEN2=$("$ENGINE" "${G[@]}" exec "$NAME" cat data/api-token)
[ "$TOKEN2" = "$TOKEN" ] || fail "the token changed across the restart"
ok "same token after the restart"
wait_for 10 "message $CONTROL_ID still listed after the restart" listed
wait_for 30 "Patient SMK4711 still served after the restart" patient_there
"$ENGINE" "${G[@]}" stop -t 30 "$NAME" >"$WORK/stop.log" 2>&1 || fail "second stop ($(cat "$WORK/stop.log"))"
code=$("$ENGINE" "${G[@]}" inspect --format '{{.State.ExitCode}}' "$NAME")
[ "$code" = 0 ] || fail "exit code $code after the second SIGTERM"
ok "second stop: exit code 0"
cleanup_container
if [ "${SMOKE_KEEP:-}" = 1 ]; then
    say "volumes kept: $NAME-data $NAME-keys $NAME-outbox"
else
    cleanup_volumes
fi
say "== all $CHECKS checks passed ($ENGINE $("$ENGINE" --version | awk '{print $NF}'), image $IMAGE)"
