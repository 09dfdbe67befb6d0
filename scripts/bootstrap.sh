#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the project into it.
# Needs only Python 3.11 and pip; torch comes from the package registry (CUDA build, runs on CPU).
# The search page's browser test drives Debian's chromium (Playwright's own browser download
# cannot work offline): installed here with apt-get when it is missing and we are root (CI is).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[dev]"
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
