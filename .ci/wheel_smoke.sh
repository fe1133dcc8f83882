#!/usr/bin/env bash
# Release check: build the sdist and the wheel, install the wheel in a fresh virtual environment
# with only the core dependencies (numpy, torch) and run the core-only smoke test from outside the
# checkout, so the installed package is what runs; then reinstall from the sdist and run it again.
#
# `wheel_smoke.sh --prepare DIR` only makes the fresh environment (a venv with torch) in DIR, so
# that .ci/run can make it while the development environment installs; `SMOKE_VENV=DIR
# wheel_smoke.sh` then uses it (crossent not yet in it) instead of making one.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$repo/.venv/bin/python}"       # the development environment (has `build`)
BASE="${PYTHON:-python3}"                # the interpreter the fresh environment starts from
quiet() { "$@" 2> >(grep -v "^WARNING: Location" >&2); }  # this machine's pip config is chatty

# The fresh environment: a venv with torch only. torch by exact pin: on this CI machine 2.13.0
# resolves to the local CPU wheel (pip's find-links); elsewhere it is whatever build PyPI serves
# for the platform (see the README's install section). --no-compile: the smoke test imports
# torch a few times, and compiling those imports from source costs less than byte-compiling all
# of torch up front (this script: 97 s against 109 s). The test suite's venv (Makefile) is
# byte-compiled: it imports torch in many processes.
make_env() {
    "$BASE" -m venv "$1"
    quiet "$1/bin/pip" install -q --no-compile torch==2.13.0
}
if [ "${1:-}" = "--prepare" ]; then
    make_env "$2"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$PY" -m build --outdir "$work/dist" "$repo" > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
ls -l "$work/dist"

if [ -n "${SMOKE_VENV:-}" ]; then
    env="$SMOKE_VENV"
    [ -x "$env/bin/pip" ] || { echo "SMOKE_VENV=$env holds no virtual environment"; exit 1; }
    if "$env/bin/pip" show -q crossent 2> /dev/null; then
        echo "SMOKE_VENV=$env already holds crossent: pass a fresh one (--prepare)"; exit 1
    fi
else
    env="$work/venv"
    make_env "$env"
fi
quiet "$env/bin/pip" install -q "$work"/dist/crossent-*.whl
echo "--- core-only install from the wheel: pip list"
"$env/bin/pip" list --format=freeze 2>/dev/null | grep -v -E '^(pip|setuptools)=='
cd "$work"
"$env/bin/crossent" --version
"$env/bin/python" "$repo/.ci/smoke_core.py"

echo "--- the same from the sdist"
quiet "$env/bin/pip" install -q --force-reinstall --no-deps "$work"/dist/crossent-*.tar.gz
"$env/bin/crossent" --version
"$env/bin/python" "$repo/.ci/smoke_core.py" | tail -n 1
echo "wheel and sdist smoke test: passed"
