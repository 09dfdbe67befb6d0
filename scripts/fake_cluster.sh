#!/usr/bin/env bash
# cluster.yaml on this machine, with one command: Ray's fake multi-node autoscaler runs
# cluster-fake.yaml (a CPU-0 head, GPU-type and shard_host-type workers that the real autoscaler
# starts as raylets on this box when work asks for them and stops when they idle).
#
#   bash scripts/fake_cluster.sh up       # head on 127.0.0.1:6379, dashboard + job API on :8265
#   bash scripts/fake_cluster.sh status   # the autoscaler's view (ray status)
#   bash scripts/fake_cluster.sh scale '{"CPU": 2, "shard_host": 1}'   # start a shard worker now
#   bash scripts/fake_cluster.sh down     # stops this cluster's processes, and only them
#
# Then use it as a real cluster (docs/cluster.md, "The same cluster on one machine"):
#   export RAY_ADDRESS=http://127.0.0.1:8265
#   ray job submit --working-dir . -- python pipelines/embed.py --input DIR --store $PWD/store \
#       --num-gpus 1 --actors 1
# Needs the project's .venv (scripts/bootstrap.sh). RAY_TEMP (default /tmp/vs-fake-cluster) is
# where its logs go; FAKE_PORT / FAKE_DASHBOARD_PORT move the GCS / dashboard ports.
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=${RAY:-$PWD/.venv/bin/ray}
TEMP=${RAY_TEMP:-/tmp/vs-fake-cluster}
PORT=${FAKE_PORT:-6379}
DASHBOARD_PORT=${FAKE_DASHBOARD_PORT:-8265}
# loopback only, no token file, no telemetry (pipelines/local_ray.py); the fake provider itself
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
export RAY_FAKE_CLUSTER=1 AUTOSCALER_UPDATE_INTERVAL_S=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the venv first on the PATH Ray keeps: a job's `python` (and the workers' `ray`) are the
# project's even when this script is run from a shell without the venv activated
export PATH="$(dirname "$RAY"):$PATH"

case "${1:-up}" in
up)
    mkdir -p "$TEMP"
    config="$TEMP/autoscaling.yaml"
    # the workers join the head's GCS at provider.gcs_address
    sed "s|^    type: fake_multinode|&\n    gcs_address: \"127.0.0.1:$PORT\"|" cluster-fake.yaml >"$config"
    # its own session: `down` stops this process group (the head's daemons and the workers)
    setsid "$RAY" start --head --num-cpus=0 --node-ip-address=127.0.0.1 --port="$PORT" \
        --autoscaling-config="$config" --temp-dir="$TEMP" --object-store-memory=268435456 \
        --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
        --labels=visual-search/role=head &
    echo $! >"$TEMP/pgid"
    wait $!
    echo "fake cluster up: RAY_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT (logs in $TEMP)"
    ;;
status)
    "$RAY" status --address="127.0.0.1:$PORT"
    ;;
scale)
    # room for BUNDLE (JSON) x COUNT now, e.g. scale '{"CPU": 2, "shard_host": 1}' 1; no
    # argument withdraws it. Needed before `build_index.py` here: its tasks ask for memory=,
    # which the fake provider cannot advertise, so they never make the autoscaler add a node.
    # After an embed job, Ray Data's coordinator actor replaces this request within 20 s (it
    # sends its own): run it right before the build, again if `status` shows the worker gone.
    "${PYTHON:-$PWD/.venv/bin/python}" - "${2:-}" "${3:-1}" "127.0.0.1:$PORT" <<'PY'
import json, sys
import ray
from ray.autoscaler.sdk import request_resources
bundle, count, address = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ray.init(address=address, log_to_driver=False)
request_resources(bundles=[json.loads(bundle)] * count if bundle else [])
print(f"asked the autoscaler for {count} x {bundle}" if bundle else "request withdrawn")
PY
    ;;
down)
    pgid=$(cat "$TEMP/pgid")
    kill -TERM -- "-$pgid" 2>/dev/null || true
    for _ in $(seq 20); do
        kill -0 -- "-$pgid" 2>/dev/null || break
        sleep 0.5
    done
    kill -KILL -- "-$pgid" 2>/dev/null || true
    rm -f "$TEMP/pgid"
    echo "fake cluster down"
    ;;
*)
    echo "usage: $0 up|status|scale [BUNDLE_JSON [COUNT]]|down" >&2
    exit 2
    ;;
esac
