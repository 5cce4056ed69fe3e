#!/usr/bin/env bash
# Canary + rollback drill (CONTRACT.md §6, runbook §13): snapshot (`vibrato snapshot-create`), run a canary
# `vibrato serve-v2` under real traffic, check SLOs from /v2/metrics and integrity from
# /v2/admin/stats, stop it (SIGTERM), `vibrato snapshot-restore`, restart and verify that the data
# equals the snapshot (counts, next id, sampled vectors and metadata). Exits non-zero on any miss.
# Harness: scripts/ops/canary_drill.py.
#
#   bash scripts/ops/canary_rollback_drill.sh                          # seeded temp data dir, 30 s canary
#   DATA_DIR=./vibrato_data VIBRATO_CANARY_SECS=259200 bash scripts/ops/canary_rollback_drill.sh   # 72 h
#
# Knobs: DATA_DIR (an existing data dir with no server running; default: a seeded temp dir),
# COLLECTION (default), PORT (free port), VIBRATO_CANARY_SECS (30), VIBRATO_CANARY_SEED_ROWS (5000),
# VIBRATO_CANARY_SAMPLE (200), VIBRATO_CANARY_MAX_ERROR_RATE (0.001),
# VIBRATO_CANARY_MAX_QUERY_P99_MS (250), VIBRATO_CANARY_DIM (16, seeded mode).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib/venv.sh  # installs what the script needs (quietly when up to date); sets PY
set -x
exec "$PY" scripts/ops/canary_drill.py "$@"
