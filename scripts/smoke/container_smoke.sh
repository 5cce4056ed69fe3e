#!/usr/bin/env bash
# Container smoke (CONTRACT.md §6, runbook §14): build the Dockerfile, run `vibrato serve-v2` in it as
# the image's non-root user with a host data dir mounted, wait for health, create a key with `<engine>
# exec ... vibrato key-create`, ingest a vector, query it back (id and score checked), stop with SIGTERM
# and require a clean exit (code 0, "shutdown complete" in the log).
#
#   bash scripts/smoke/container_smoke.sh
#
# Engine: podman (preferred; Debian's package, run with runc and explicit ulimits because crun
# refuses hybrid cgroups here) or docker when its daemon answers. With neither, the script FAILS with
# a message; it never passes silently. VIBRATO_SMOKE_INSTALL=1 lets it `apt-get install podman runc
# debootstrap` first (root only).
#
# Base image: VIBRATO_SMOKE_BASE_IMAGE (default localhost/debian-python:bookworm). When that local
# image does not exist and the name starts with localhost/, it is made with debootstrap
# (--variant=minbase --include=python3, from the Debian mirror apt uses) and `podman import`.
# Set VIBRATO_SMOKE_BASE_IMAGE=python:3.11-slim-bookworm to use the Dockerfile's default where a
# registry is reachable.
#
# Package indexes for the build: the host's CA bundle is mounted at /host-ca.crt (PIP_CERT) and the
# host's pip index/find-links settings (`pip config list`, PIP_* env) are passed as build args; any
# file:// index or find-links directory is mounted read-only at the same path.
#
# Knobs: VIBRATO_SMOKE_IMAGE_TAG (localhost/vibrato:smoke), VIBRATO_SMOKE_PORT (18080),
# VIBRATO_SMOKE_CONTAINER (vibrato-smoke),
# VIBRATO_SMOKE_DIM (16), VIBRATO_SMOKE_KEEP=1 (keep the temp dir).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO="$(pwd)"
IMAGE_TAG="${VIBRATO_SMOKE_IMAGE_TAG:-localhost/vibrato:smoke}"
PORT="${VIBRATO_SMOKE_PORT:-18080}"
CONTAINER_NAME="${VIBRATO_SMOKE_CONTAINER:-vibrato-smoke}"
DIM="${VIBRATO_SMOKE_DIM:-16}"
BASE_IMAGE="${VIBRATO_SMOKE_BASE_IMAGE:-localhost/debian-python:bookworm}"
PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python
log() { echo "[smoke] $*"; }
die() { echo "[smoke] FAILED: $*" >&2; exit 1; }
run() { echo "+ $*"; "$@"; }

# ------------------------------------------------------------------ container engine
if [ "${VIBRATO_SMOKE_INSTALL:-0}" = "1" ] && ! command -v podman >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "VIBRATO_SMOKE_INSTALL=1 needs root for apt-get"
    run apt-get update -qq
    DEBIAN_FRONTEND=noninteractive run apt-get install -y -qq podman runc debootstrap uidmap
fi
ENGINE=""
ENGINE_RUN_OPTS=()
if command -v podman >/dev/null 2>&1 && podman info >/dev/null 2>&1; then
    ENGINE=podman
    command -v runc >/dev/null 2>&1 || die "podman found but runc is missing (apt-get install runc; crun refuses this host's cgroups)"
    ENGINE_RUN_OPTS=(--runtime runc --ulimit nofile=20000:20000 --ulimit nproc=32768:32768)
elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    ENGINE=docker
else
    die "no container engine available: install podman (apt-get install -y podman runc debootstrap, or run with VIBRATO_SMOKE_INSTALL=1) or start a Docker daemon"
fi
log "engine: $ENGINE ($($ENGINE --version))"

# ------------------------------------------------------------------ base image
image_exists() { $ENGINE image inspect "$1" >/dev/null 2>&1; }
if ! image_exists "$BASE_IMAGE"; then
    case "$BASE_IMAGE" in
        localhost/*)
            [ "$ENGINE" = podman ] || die "base image $BASE_IMAGE is missing and can only be made with podman import"
            command -v debootstrap >/dev/null 2>&1 || die "base image $BASE_IMAGE is missing and debootstrap is not installed (apt-get install -y debootstrap)"
            MIRROR="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
            [ -n "$MIRROR" ] || MIRROR="$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
            MIRROR="${MIRROR:-http://deb.debian.org/debian}"
            ROOTFS="$(mktemp -d /var/tmp/vibrato-rootfs.XXXXXX)"
            log "making base image $BASE_IMAGE with debootstrap from $MIRROR (about a minute)"
            run debootstrap --variant=minbase --include=python3 bookworm "$ROOTFS" "$MIRROR" >/dev/null
            echo "+ tar -C $ROOTFS -c . | podman import - $BASE_IMAGE"
            tar -C "$ROOTFS" -c . | podman import - "$BASE_IMAGE" >/dev/null
            rm -rf "$ROOTFS"
            ;;
        *)
            log "base image $BASE_IMAGE not present locally; the build will try to pull it"
            ;;
    esac
fi

# ------------------------------------------------------------------ build
BUILD_OPTS=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
pipcfg() { "$PY" -m pip config get "$1" 2>/dev/null | head -1 || true; }
CA=""
for c in "${PIP_CERT:-}" "$(pipcfg global.cert)" /etc/ssl/certs/ca-certificates.crt; do
    if [ -n "$c" ] && [ -f "$c" ]; then CA="$c"; break; fi
done
MOUNTS=()
if [ -n "$CA" ]; then
    MOUNTS+=(-v "$CA:/host-ca.crt:ro")
    BUILD_OPTS+=(--build-arg PIP_CERT=/host-ca.crt)
fi
INDEX="${PIP_INDEX_URL:-$(pipcfg global.index-url)}"
EXTRA="${PIP_EXTRA_INDEX_URL:-$(pipcfg global.extra-index-url)}"
LINKS="${PIP_FIND_LINKS:-$(pipcfg global.find-links)}"
[ -n "$INDEX" ] && BUILD_OPTS+=(--build-arg "PIP_INDEX_URL=$INDEX")
[ -n "$EXTRA" ] && BUILD_OPTS+=(--build-arg "PIP_EXTRA_INDEX_URL=$EXTRA")
[ -n "$LINKS" ] && BUILD_OPTS+=(--build-arg "PIP_FIND_LINKS=$LINKS")
# Local indexes (file:// URLs and find-links directories) are mounted at the same path.
for loc in $INDEX $EXTRA $LINKS; do
    path="${loc#file://}"
    case "$path" in /*) ;; *) continue ;; esac
    [ -d "$path" ] || continue
    top="/$(echo "$path" | cut -d/ -f2,3)"   # e.g. /opt/pypi from /opt/pypi/simple
    [ -d "$top" ] || top="$path"
    case " ${MOUNTS[*]} " in *" $top:$top:ro "*) ;; *) MOUNTS+=(-v "$top:$top:ro") ;; esac
done
if [ "$ENGINE" = podman ]; then
    run podman build --runtime runc --format docker --ulimit nofile=20000:20000 --ulimit nproc=32768:32768 \
        "${MOUNTS[@]}" "${BUILD_OPTS[@]}" -t "$IMAGE_TAG" "$REPO"
else
    # docker build cannot mount volumes: only remote indexes and the default CA work there.
    run docker build "${BUILD_OPTS[@]}" -t "$IMAGE_TAG" "$REPO"
fi

# ------------------------------------------------------------------ image checks
USER_IN_IMAGE="$($ENGINE image inspect -f '{{.Config.User}}' "$IMAGE_TAG")"
HEALTH_IN_IMAGE="$($ENGINE image inspect -f '{{json .Config.Healthcheck}}' "$IMAGE_TAG" 2>/dev/null || true)"
log "image user=$USER_IN_IMAGE healthcheck=$HEALTH_IN_IMAGE"
case "$USER_IN_IMAGE" in ""|root|0|0:0) die "the image runs as root (USER=$USER_IN_IMAGE)";; esac
case "$HEALTH_IN_IMAGE" in *health/live*) ;; *) die "the image has no HEALTHCHECK on /v2/health/live";; esac
if $ENGINE run --rm "${ENGINE_RUN_OPTS[@]}" --entrypoint sh "$IMAGE_TAG" -c 'command -v gcc cc' >/dev/null 2>&1; then
    die "the runtime image contains a C compiler"
fi
IMAGE_UID="${USER_IN_IMAGE%%:*}"

# ------------------------------------------------------------------ run
WORK="$(mktemp -d /tmp/vibrato-smoke.XXXXXX)"
DATA="$WORK/data"
mkdir -p "$DATA"
# The host dir must be owned by the image's non-root user (the server refuses a data dir owned by
# someone else or writable by group/others, so a chmod 0777 would not do).
chown "$USER_IN_IMAGE" "$DATA" || die "cannot chown $DATA to the image's user $USER_IN_IMAGE (run as root)"
chmod 0700 "$DATA"
cleanup() {
    rc=$?
    if [ $rc -ne 0 ]; then
        log "container logs:"; $ENGINE logs "$CONTAINER_NAME" 2>&1 | tail -40 || true
    fi
    $ENGINE rm -f "$CONTAINER_NAME" >/dev/null 2>&1 || true
    if [ "${VIBRATO_SMOKE_KEEP:-0}" = "1" ] || [ $rc -ne 0 ]; then
        log "kept $WORK"
    else
        rm -rf "$WORK" 2>/dev/null || true
    fi
    exit $rc
}
trap cleanup EXIT
$ENGINE rm -f "$CONTAINER_NAME" >/dev/null 2>&1 || true
run $ENGINE run -d --name "$CONTAINER_NAME" "${ENGINE_RUN_OPTS[@]}" -p "127.0.0.1:$PORT:8080" \
    -v "$DATA:/var/lib/vibrato" "$IMAGE_TAG" \
    serve-v2 --data-dir /var/lib/vibrato --collection default --dim "$DIM" --host 0.0.0.0 --port 8080 \
    --public-health-metrics true --checkpoint-interval-secs 3600 --compaction-interval-secs 3600

URL="http://127.0.0.1:$PORT"
log "waiting for $URL/v2/health/live"
ok=0
for _ in $(seq 1 120); do
    state="$($ENGINE inspect -f '{{.State.Running}}' "$CONTAINER_NAME" 2>/dev/null || echo false)"
    [ "$state" = true ] || die "the container stopped before it became healthy"
    if curl -fsS -m 2 "$URL/v2/health/live" >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.5
done
[ $ok = 1 ] || die "/v2/health/live did not answer 200 within 60 s"
PROC_UID="$($ENGINE exec "$CONTAINER_NAME" sh -c 'id -u')"
[ "$PROC_UID" = "$IMAGE_UID" ] && [ "$PROC_UID" != 0 ] || die "server runs as uid $PROC_UID, expected $IMAGE_UID (non-root)"
if [ "$ENGINE" = podman ]; then
    run podman healthcheck run "$CONTAINER_NAME" || die "the image HEALTHCHECK failed"
fi
KEY_OUT="$($ENGINE exec "$CONTAINER_NAME" vibrato key-create --data-dir /var/lib/vibrato --name smoke --roles admin,query,ingest)"
echo "+ $ENGINE exec $CONTAINER_NAME vibrato key-create ... -> $(echo "$KEY_OUT" | grep '^id=')"
TOKEN="$(echo "$KEY_OUT" | sed -n 's/^token=//p')"
[ -n "$TOKEN" ] || die "key-create printed no token: $KEY_OUT"
for _ in $(seq 1 120); do
    code="$(curl -s -o /dev/null -w '%{http_code}' -m 2 -H "Authorization: Bearer $TOKEN" "$URL/v2/health/ready" || true)"
    [ "$code" = 200 ] && break
    sleep 0.5
done
[ "$code" = 200 ] || die "/v2/health/ready answered $code"
for path in /v2/health/live /v2/health/ready /v2/metrics; do
    curl -fsS -m 5 -H "Authorization: Bearer $TOKEN" "$URL$path" >/dev/null || die "GET $path failed"
done
VEC="$("$PY" -c "print([1.0] + [0.0] * ($DIM - 1))")"
INGEST="$(curl -fsS -m 10 -X POST "$URL/v2/vectors" -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
    -d "{\"vector\": $VEC, \"metadata\": {\"source_file\": \"smoke.wav\", \"start_time_ms\": 0, \"duration_ms\": 100, \"bpm\": 120, \"tags\": [\"smoke\"]}, \"idempotency_key\": \"smoke-1\"}")" \
    || die "POST /v2/vectors failed"
echo "+ POST /v2/vectors -> $INGEST"
QUERY="$(curl -fsS -m 10 -X POST "$URL/v2/query" -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
    -d "{\"vector\": $VEC, \"k\": 1, \"ef\": 20, \"include_metadata\": true}")" || die "POST /v2/query failed"
echo "+ POST /v2/query -> $QUERY"
INGEST="$INGEST" QUERY="$QUERY" "$PY" - <<'EOF' || die "query did not return the ingested vector"
import json, os
ing = json.loads(os.environ["INGEST"])["data"]
res = json.loads(os.environ["QUERY"])["data"]["results"]
assert ing["created"] is True, ing
assert res and res[0]["id"] == ing["id"], (ing, res)
assert abs(res[0]["score"] - 1.0) < 1e-5, res[0]
assert res[0]["metadata"]["source_file"] == "smoke.wav" and res[0]["metadata"]["tags"] == ["smoke"], res[0]
print(f"[smoke] query returned id {res[0]['id']} with score {res[0]['score']}")
EOF

# ------------------------------------------------------------------ graceful stop
run $ENGINE kill --signal TERM "$CONTAINER_NAME" >/dev/null
for _ in $(seq 1 120); do
    state="$($ENGINE inspect -f '{{.State.Running}}' "$CONTAINER_NAME" 2>/dev/null || echo false)"
    [ "$state" = false ] && break
    sleep 0.5
done
[ "$state" = false ] || die "the container did not stop within 60 s of SIGTERM"
EXIT_CODE="$($ENGINE inspect -f '{{.State.ExitCode}}' "$CONTAINER_NAME")"
[ "$EXIT_CODE" = 0 ] || die "the server exited with code $EXIT_CODE after SIGTERM"
$ENGINE logs "$CONTAINER_NAME" 2>&1 | grep -q "shutdown complete" || die "no 'shutdown complete' in the server log"
[ ! -e "$DATA/catalog.sqlite3-wal" ] || [ ! -s "$DATA/catalog.sqlite3-wal" ] || die "SQLite WAL not truncated at shutdown"
[ "$(stat -c %u "$DATA/catalog.sqlite3")" = "$IMAGE_UID" ] || die "catalog.sqlite3 is not owned by uid $IMAGE_UID"
log "container smoke passed (exit code $EXIT_CODE after SIGTERM)"
