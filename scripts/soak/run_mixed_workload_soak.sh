#!/usr/bin/env bash
# Soak gate (CONTRACT.md §6, runbook §12): mixed ingest/query/checkpoint/compaction at a target rate
# against the real `vibrato serve-v2`, sampling RSS, open fds, temp segment files, SQLite WAL size and
# active segments; asserts bounded growth and exact counts. Harness: tests/gates/test_soak.py.
#
#   bash scripts/soak/run_mixed_workload_soak.sh                                   # CI: 90 s
#   VIBRATO_SOAK_SECS=86400 VIBRATO_SOAK_SEED=42 bash scripts/soak/run_mixed_workload_soak.sh   # 24 h
#
# Knobs (v2.1's, CONTRACT.md R6): VIBRATO_SOAK_SECS (90 here), VIBRATO_SOAK_SEED (42),
# VIBRATO_SOAK_SAMPLE_INTERVAL_SECS (secs/30, 1..60), VIBRATO_SOAK_TARGET_OPS_PER_SEC (500),
# VIBRATO_SOAK_MAX_RSS_GROWTH_PCT (35), VIBRATO_SOAK_MAX_FD_GROWTH (256),
# VIBRATO_SOAK_MAX_TMP_VDB_FILES (8); ours: VIBRATO_SOAK_MAX_SQLITE_WAL_BYTES (64 MiB),
# VIBRATO_SOAK_MAX_ACTIVE_SEGMENTS (64), VIBRATO_SOAK_PRELOAD (50000), VIBRATO_SOAK_WARMUP_SECS,
# VIBRATO_SOAK_WORKERS (4), VIBRATO_SOAK_OUT (perf/results/soak: CSV + PNG per run).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib/venv.sh  # installs what the script needs (quietly when up to date); sets PY
export VIBRATO_SOAK_SECS="${VIBRATO_SOAK_SECS:-90}"
export VIBRATO_SOAK_SEED="${VIBRATO_SOAK_SEED:-42}"
echo "[soak] VIBRATO_SOAK_SECS=$VIBRATO_SOAK_SECS VIBRATO_SOAK_SEED=$VIBRATO_SOAK_SEED"
set -x
"$PY" -m pytest tests/gates/test_soak.py -p no:cacheprovider -o addopts="" -rA -s --timeout=0 "$@"
