#!/usr/bin/env bash
# madvise A/B harness (CONTRACT.md §6, runbook §11): query latency of the real `vibrato serve-v2` with
# --vector-madvise-mode normal vs random, cold (segment pages dropped with posix_fadvise DONTNEED) and
# warm, same queries, on one ~0.5 GB segment larger than the server's page-cache share (the server
# runs in a memory cgroup that leaves room for 40% of it). Harness: perf/bench_madvise_ab.py.
#
#   bash scripts/perf/run_madvise_ab.sh                                  # report only
#   VIBRATO_ENFORCE_MADVISE_GATE=1 bash scripts/perf/run_madvise_ab.sh   # fail if random p99 > 1.30 x normal p99
#
# Knobs: VIBRATO_MADVISE_ROWS (250000), VIBRATO_MADVISE_DIM (512), VIBRATO_MADVISE_QUERIES (300),
# VIBRATO_MADVISE_GATE_RATIO (1.30), VIBRATO_MADVISE_CACHE_SHARE (0.4; 0 = no cgroup),
# VIBRATO_MADVISE_DATA_DIR (reuse a built data dir across runs), VIBRATO_MADVISE_ARCHIVE=1 (the same rows
# as one L2 archive, queried with search_tier=archive).
# Output: p50/p99 per mode and cache state, the ratios, perf/results/madvise_ab_<ts>.json
# (pytest-benchmark) and perf/results/madvise_ab_summary.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib/venv.sh  # installs what the script needs (quietly when up to date); sets PY
mkdir -p perf/results
OUT="perf/results/madvise_ab_$(date +%Y%m%d-%H%M%S).json"
echo "[madvise] VIBRATO_ENFORCE_MADVISE_GATE=${VIBRATO_ENFORCE_MADVISE_GATE:-0} rows=${VIBRATO_MADVISE_ROWS:-250000} dim=${VIBRATO_MADVISE_DIM:-512}"
set -x
"$PY" -m pytest perf/bench_madvise_ab.py -p no:cacheprovider -o addopts="" -s -rA --timeout=0 \
    --benchmark-json="$OUT" --benchmark-columns=min,median,mean,max,rounds \
    --benchmark-sort=name "$@"
set +x
echo "[madvise] pytest-benchmark JSON: $OUT"
