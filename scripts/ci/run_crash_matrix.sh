#!/usr/bin/env bash
# Crash matrix gate (CONTRACT.md §6, runbook §9): SIGKILL the real `vibrato serve-v2` during ingest,
# checkpoint and compaction windows and in a concurrent batch-writer ("Jepsen") workload, restart,
# verify every acknowledged write and that nothing un-attempted exists. Harness:
# tests/gates/test_crash_matrix.py.
#
#   VIBRATO_CRASH_SEEDS=10 bash scripts/ci/run_crash_matrix.sh     # PR subset (default 10)
#   VIBRATO_CRASH_SEEDS=100 bash scripts/ci/run_crash_matrix.sh    # nightly
#
# Knobs: VIBRATO_CRASH_SEEDS (10), VIBRATO_JEPSEN_CRASH_SEEDS (2), VIBRATO_JEPSEN_WRITERS (4),
# VIBRATO_JEPSEN_BATCH_SIZE (64), VIBRATO_JEPSEN_KILL_MIN_MS (80), VIBRATO_JEPSEN_KILL_MAX_MS (1200),
# VIBRATO_JEPSEN_VERIFY_CAP (500), VIBRATO_CRASH_PRELOAD_ROWS (3000), VIBRATO_GATE_WORKDIR (tmp),
# VIBRATO_GATE_KEEP=1 keeps every data dir; a failing seed always keeps its own and prints the path.
# VIBRATO_CRASH_INJECT=drop-sqlite-wal deletes the catalog's SQLite WAL after each kill (proves the
# gate fails when acknowledged writes are lost).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib/venv.sh  # installs what the script needs (quietly when up to date); sets PY
export VIBRATO_CRASH_SEEDS="${VIBRATO_CRASH_SEEDS:-10}"
export VIBRATO_JEPSEN_CRASH_SEEDS="${VIBRATO_JEPSEN_CRASH_SEEDS:-2}"
echo "[crash-matrix] VIBRATO_CRASH_SEEDS=$VIBRATO_CRASH_SEEDS VIBRATO_JEPSEN_CRASH_SEEDS=$VIBRATO_JEPSEN_CRASH_SEEDS"
set -x
"$PY" -m pytest tests/gates/test_crash_matrix.py -p no:cacheprovider -o addopts="" -rA -s --timeout=0 "$@"
