#!/usr/bin/env bash
# Malformed-input gate for the HTTP API (CONTRACT.md §6, Malformed input): schemathesis cases generated
# from the server's own GET /v2/openapi.json (positive and negative modes) plus raw malformed bodies,
# against a real `vibrato serve-v2`: no 5xx, JSON error bodies, no hang (per-request timeout), no crash.
# Harness: tests/gates/test_api_fuzz.py. (File parsers are fuzzed by tests/test_segment_fuzz.py.)
#
#   bash scripts/ci/run_api_fuzz.sh
#   VIBRATO_FUZZ_MAX_EXAMPLES=2000 bash scripts/ci/run_api_fuzz.sh     # long form
#
# Knobs: VIBRATO_FUZZ_MAX_EXAMPLES (100 per operation and mode), VIBRATO_FUZZ_REQUEST_TIMEOUT_SECS (10).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib/venv.sh  # installs what the script needs (quietly when up to date); sets PY
set -x
"$PY" -m pytest tests/gates/test_api_fuzz.py -p no:cacheprovider -o addopts="" -rA -s --timeout=0 "$@"
