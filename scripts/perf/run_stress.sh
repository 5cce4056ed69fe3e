#!/usr/bin/env bash
# Stress benchmark (CONTRACT.md §6, Stress; v2.1's is R7): mixed queries (60%) and batched writes (40%)
# from VIBRATO_STRESS_CONCURRENCY (16) concurrent clients against the real `vibrato serve-v2`; reports
# ops/s and checks dense ids, exact counts and that sampled writes are findable. Harness:
# perf/stress_million_ops.py.
#
#   bash scripts/perf/run_stress.sh                                   # smoke: 20,000 ops
#   VIBRATO_STRESS_TOTAL_OPS=1000000 bash scripts/perf/run_stress.sh  # the million
#
# Knobs: VIBRATO_STRESS_TOTAL_OPS, _CONCURRENCY, _SEED (42), _HTTP_TIMEOUT_SECS (30),
# _BATCH_TIMEOUT_SECS (90), _WRITE_FLUSH_PARALLELISM (4), _WRITE_FLUSH_RETRIES (4),
# _ENABLE_ADMIN_CHAOS (0), _MAX_ELAPSED_SECS (0 = report only), _STARTUP_RETRIES (4).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib/venv.sh  # installs what the script needs (quietly when up to date); sets PY
set -x
exec "$PY" perf/stress_million_ops.py "$@"
