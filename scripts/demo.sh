#!/usr/bin/env bash
# One command from a fresh clone: install (scripts/bootstrap.sh), then run the demo end to end:
# embed the built-in photo set (or --images DIR_OR_URI), build the shard indexes, start Serve on
# 127.0.0.1:8000 (--port), run a sample query and print a ready curl line. Ctrl-C stops serving;
# --exit stops after the sample query. Other flags: python -m visual_search.demo --help.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m visual_search.demo "$@"
