"""Samplers of the machine's processes, on a thread of their own while a benchmark's stage runs:
CPU seconds by role (``CpuSampler``: which processes a job's cores went to) and the peak summed
RSS of this process and its descendants (``PeakRss``: Ray's raylet, workers and Serve replicas
started from here).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import psutil


def title_of(cmdline: str) -> str:
    """A process's short title: a Ray worker's ``ray::<actor or task>`` (a Serve replica's
    ``ray::ServeReplica:<app>:<deployment>``), else its program's file name."""
    first = cmdline.split(" ", 1)[0] if cmdline else "?"
    if first.startswith("ray::"):  # not the method it runs now: ray::Actor.method
        return first.split(".", 1)[0]
    return os.path.basename(first) + (
        " " + os.path.basename(cmdline.split(" ")[1])
        if first.endswith("python") and " " in cmdline
        else ""
    )


class CpuSampler:
    """CPU seconds of every process on the machine while it runs, by role: ``roles`` pairs a
    part of a process's title with its role (the first that matches wins), this process is
    ``driver_role``; ``wall_s`` and ``machine_busy_s`` (all cores) once it has stopped.
    ``by_title``: the same seconds by each process's short title (``title_of``), to see which
    process of a role spent them (a Serve replica of which deployment, the proxy, the raylet)."""

    def __init__(self, roles: tuple[tuple[str, str], ...], driver_role: str, interval_s=1.0):
        self.roles, self.driver_role = roles, driver_role
        self.interval_s = interval_s
        self.seconds: dict[str, float] = {}
        self.by_title: dict[str, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _machine_busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)

    def role(self, pid: int, title: str) -> str:
        if pid == os.getpid():
            return self.driver_role
        for key, role in self.roles:
            if key in title:
                return role
        return "other processes"

    def sample(self, count: bool = True) -> None:
        """Add each process's CPU since the last sample to its role (a process born since the
        first sample counts whole: it is the job's)."""
        for proc in psutil.process_iter(["pid", "cmdline", "name", "cpu_times"]):
            info = proc.info
            times = info.get("cpu_times")
            if times is None:
                continue
            used = times.user + times.system
            before = self._last.get(info["pid"], 0.0)
            self._last[info["pid"]] = used
            if count:
                title = " ".join(info.get("cmdline") or [info.get("name") or ""])
                role = self.role(info["pid"], title)
                spent = max(0.0, used - before)
                self.seconds[role] = self.seconds.get(role, 0.0) + spent
                short = title_of(title)
                self.by_title[short] = self.by_title.get(short, 0.0) + spent

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> CpuSampler:
        self.sample(count=False)  # every process alive now: only what it uses from here counts
        self._machine_start = self._machine_busy()
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        self.wall_s = time.perf_counter() - self._started
        self.machine_busy_s = self._machine_busy() - self._machine_start


class PeakRss:
    """The summed RSS (bytes) of this process tree, sampled every ``every_s``; ``stage`` records
    each stage's peak and wall seconds in ``stages``. Shared pages (the mapped index files, Ray's
    object store) count once per process that maps them, so the sum is an upper bound."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.every_s = every_s
        self.stages: dict[str, dict] = {}
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self._thread.start()

    @staticmethod
    def tree_rss() -> int:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # gone between the listing and the read
                total += proc.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._peak = max(self._peak, self.tree_rss())

    @contextlib.contextmanager
    def stage(self, name: str):
        self._peak, t = self.tree_rss(), time.perf_counter()
        try:
            yield
        finally:
            self._peak = max(self._peak, self.tree_rss())
            self.stages[name] = {
                "seconds": round(time.perf_counter() - t, 1),
                "peak_rss_gib": round(self._peak / 2**30, 2),
            }
            print(f"stage {name}: {self.stages[name]}", flush=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
