"""Room asked of a test cluster's autoscaler, held for as long as a block of work runs.

``ray.autoscaler.sdk.request_resources`` keeps one request per cluster, and the last caller's
replaces everyone else's. Asked once, a request does not hold on a cluster where a Ray Data job
has run: Ray Data leaves an autoscaling coordinator actor behind that sends its own merged
requests (none, once its job is done) through the same call every 20 s. On the fake cluster
(``harness.fake_cluster``), in 2 of ~11 fresh runs of the suite, the shard worker started for the
index build then idled away (its idle timeout is 15 s) while the build job's runtime env was set
up (47 s in one), and the build's tasks, which ask for ``memory=``, cannot make the fake provider
start another (``ray status``: no worker, no pending node, ``From request_resources: (none)``).
So a helper driver asks again every few seconds until the block ends, then withdraws.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator

from harness.ray_head import ROOT, RayHead

# the helper: ask (and say so once), then again every ``every`` seconds until its stdin ends,
# then withdraw
_HELPER = """\
import json, select, sys, ray
from ray.autoscaler.sdk import request_resources
ray.init(address=sys.argv[1], log_to_driver=False)
bundles, every = json.loads(sys.argv[2]), float(sys.argv[3])
request_resources(bundles=bundles)
print("asked", flush=True)
while not select.select([sys.stdin], [], [], every)[0]:
    request_resources(bundles=bundles)
request_resources(bundles=[])
"""


@contextlib.contextmanager
def holding_resources(
    head: RayHead, bundles: list[dict[str, float]], every_s: float = 5.0
) -> Iterator[None]:
    """Room for ``bundles`` asked of ``head``'s autoscaler on entry and every ``every_s`` until
    the block ends, then withdrawn (the nodes may idle away after)."""
    helper = subprocess.Popen(
        ["python", "-c", _HELPER, f"127.0.0.1:{head.gcs_port}", json.dumps(bundles), str(every_s)],
        cwd=ROOT, env=head.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        started = helper.stdout is not None and helper.stdout.readline().strip() == "asked"
        assert started, "the resource request helper did not start"
        yield
    finally:
        if helper.stdin is not None:
            helper.stdin.close()  # end of input: the helper withdraws the request and exits
        try:
            helper.wait(timeout=60)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()
