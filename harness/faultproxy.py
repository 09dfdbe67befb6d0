"""A fault proxy for the object store: an HTTP proxy on 127.0.0.1 in front of moto's S3 server
that delays requests, resets connections, drops answers and answers 500/503, on a seeded
schedule, so the code's behaviour under a slow or failing S3 can be replayed.

Point a store at ``proxy.endpoint`` instead of moto's (``proxy.storage_options``). Each request
is decided by a hash of the seed, the request's method and path (query string included, the
signature excluded) and how many times that request was seen before: the same seed gives the
same decision to the same n-th request, whatever the order in which concurrent clients send
them. Kinds:

- ``delay``: held 20-300 ms, then forwarded;
- ``reset``: the connection is closed before the request reaches the store (nothing written);
- ``drop``: forwarded (a write happens), then the connection is closed without the answer;
  the client cannot tell it from ``reset``, which is what makes it the hard case for
  conditional writes;
- ``500`` / ``503``: an S3 error answer (``InternalError`` / ``SlowDown``), nothing forwarded.

Run as a process for tests that kill it: ``python -m harness.faultproxy --upstream URL --seed N``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import threading
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from harness.polling import free_port
from harness.s3 import CREDENTIALS

KINDS = ("delay", "reset", "drop", "500", "503")
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}
_HOP_ANSWER_HEADERS = {"connection", "keep-alive", "transfer-encoding"}
_S3_ERRORS = {
    "500": ("InternalError", "We encountered an internal error. Please try again."),
    "503": ("SlowDown", "Please reduce your request rate."),
}


@dataclass
class FaultRates:
    """Probability of each kind per request (the rest pass untouched)."""

    delay: float = 0.05
    reset: float = 0.01
    drop: float = 0.005
    error_500: float = 0.01
    error_503: float = 0.01

    def thresholds(self) -> list[tuple[float, str]]:
        out, total = [], 0.0
        for kind, rate in zip(
            KINDS, (self.delay, self.reset, self.drop, self.error_500, self.error_503), strict=True
        ):
            total += rate
            out.append((total, kind))
        if total > 1:
            raise ValueError(f"fault rates add up to {total} > 1")
        return out


@dataclass
class FaultSchedule:
    """The seeded decision for each request; pure, so a run's faults replay from its seed."""

    seed: int
    rates: FaultRates = field(default_factory=FaultRates)
    enabled: bool = True

    def __post_init__(self) -> None:
        self._seen: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._thresholds = self.rates.thresholds()

    def decide(self, method: str, target: str) -> tuple[str | None, float]:
        """(kind or None, a uniform number in [0, 1) for the kind's own parameters)."""
        key = f"{method} {target}"
        with self._lock:
            nth = self._seen[key]
            self._seen[key] += 1
        if not self.enabled:
            return None, 0.0
        digest = hashlib.blake2b(f"{self.seed}|{key}|{nth}".encode(), digest_size=16).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        v = int.from_bytes(digest[8:], "big") / 2**64
        for bound, kind in self._thresholds:
            if u < bound:
                return kind, v
        return None, v


def _target(request: web.Request) -> str:
    """Path and query without the signature parts (they change with time and credentials)."""
    query = sorted((k, v) for k, v in request.query.items() if not k.lower().startswith("x-amz-"))
    return request.path + ("?" + "&".join(f"{k}={v}" for k, v in query) if query else "")


class FaultProxy:
    """The proxy, on its own thread and event loop; ``counts`` says what it injected, how many
    ``requests`` passed and of which ``kind:<method>`` (``kind:LIST`` for a listing)."""

    def __init__(self, upstream: str, schedule: FaultSchedule, port: int | None = None):
        self.upstream = upstream.rstrip("/")
        self.schedule = schedule
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.counts: collections.Counter[str] = collections.Counter()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)

    @property
    def storage_options(self) -> dict:
        return {
            "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": self.endpoint},
        }

    @property
    def faults_injected(self) -> int:
        return sum(n for kind, n in self.counts.items() if kind in KINDS)

    def start(self) -> FaultProxy:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the fault proxy did not start within 30 s")
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        app = web.Application(client_max_size=1 << 31)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=120), auto_decompress=False
        )
        await site.start()
        self._ready.set()
        while not self._stopped.is_set():
            await asyncio.sleep(0.1)
        await self._session.close()
        await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        kind, v = self.schedule.decide(request.method, _target(request))
        self.counts["requests"] += 1
        listing = request.method == "GET" and "list-type" in request.query
        self.counts[f"kind:{'LIST' if listing else request.method}"] += 1  # what was asked
        if kind is not None:
            self.counts[kind] += 1
        body = await request.read()
        if kind == "reset":
            request.transport.close()
            return web.Response(status=500)  # never sent: the connection is gone
        if kind in _S3_ERRORS:
            code, message = _S3_ERRORS[kind]
            xml = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
            return web.Response(status=int(kind), text=xml, content_type="application/xml")
        if kind == "delay":
            await asyncio.sleep(0.02 + 0.28 * v)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        url = self.upstream + request.raw_path
        async with self._session.request(
            request.method, url, headers=headers, data=body, allow_redirects=False
        ) as upstream:
            payload = await upstream.read()
            if kind == "drop":
                request.transport.close()
                return web.Response(status=500)  # never sent
            out = {
                k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_ANSWER_HEADERS
            }
            return web.Response(status=upstream.status, headers=out, body=payload)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", required=True, help="the S3 endpoint, e.g. http://127.0.0.1:5000")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int)
    defaults = FaultRates()
    for flag, default in (
        ("--delay", defaults.delay),
        ("--reset", defaults.reset),
        ("--drop", defaults.drop),
        ("--error-500", defaults.error_500),
        ("--error-503", defaults.error_503),
    ):
        p.add_argument(flag, type=float, default=default, help=f"rate (default {default})")
    args = p.parse_args(argv)
    rates = FaultRates(args.delay, args.reset, args.drop, args.error_500, args.error_503)
    proxy = FaultProxy(args.upstream, FaultSchedule(args.seed, rates), args.port).start()
    print(proxy.endpoint, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        proxy.stop()


if __name__ == "__main__":
    main()
