# Sourced by every runbook script (the gate scripts, CONTRACT.md §6): make sure .venv has vibrato and
# its test extra (the same Makefile target `make test` uses; a no-op when the stamp is newer than the
# sources), then set PY to it. So each script works verbatim on a fresh clone. The install's output is
# shown only if it fails.
# VIBRATO_SKIP_INSTALL=1 uses whatever python3 finds instead (for an already prepared environment).
if [ "${VIBRATO_SKIP_INSTALL:-0}" = "1" ]; then
    PY=python3; [ -x .venv/bin/python ] && PY=.venv/bin/python
else
    _vibrato_install_log="$(mktemp)"
    if ! make --no-print-directory -s install-test >"$_vibrato_install_log" 2>&1; then
        cat "$_vibrato_install_log" >&2
        rm -f "$_vibrato_install_log"
        echo "install failed: 'make install-test' (see above)" >&2
        exit 1
    fi
    rm -f "$_vibrato_install_log"
    PY=.venv/bin/python
fi
export PATH="$PWD/.venv/bin:$PATH"
