"""Helpers shared by the benchmarks: the fake server in its own process, /proc readings, tables."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class ServerProc:
    proc: subprocess.Popen[bytes]
    port: int
    pid: int
    impl: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def cpu_s(self) -> float:
        return proc_cpu_s(self.pid)

    def stats(self, reset: bool = False, arrivals: bool = False) -> dict[str, Any] | None:
        """The fast server's own counters (None for FakeLLM, which has no /stats)."""
        if self.impl != "fast":
            return None
        q = "&".join(k for k, on in (("reset=1", reset), ("arrivals=1", arrivals)) if on)
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats?{q}", timeout=10) as r:
            return json.loads(r.read())


@contextmanager
def server_process(
    cmd: Sequence[str], what: str, stop_timeout_s: float = 5.0, **popen: Any
) -> Iterator[tuple[subprocess.Popen[Any], dict[str, Any]]]:
    """Run a server that prints one JSON line ({"port", "pid", …}) when ready and stops when its
    stdin closes; yield the process and that line."""
    proc = subprocess.Popen(list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, **popen)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{what} exited with {proc.wait()} before printing its port")
        yield proc, json.loads(line)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # the server stops when its stdin closes
        try:
            proc.wait(timeout=stop_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def fake_server(impl: str = "fast", models: Sequence[str] = ()) -> Iterator[ServerProc]:
    """Start bench/fake_server_process.py in a separate process; stop it on exit."""
    cmd = [sys.executable, str(BENCH_DIR / "fake_server_process.py"), "--impl", impl, "--models", ",".join(models)]
    with server_process(cmd, "fake server") as (proc, info):
        yield ServerProc(proc=proc, port=info["port"], pid=info["pid"], impl=impl)


def proc_cpu_s(pid: int) -> float:
    """user + system CPU seconds of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14 and 15)


def system_busy_s() -> float:
    """CPU seconds all processes have used on this machine (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return (sum(parts[:8]) - idle) / _CLK_TCK  # user..steal, without guest (already in user)


def wait_quiet(max_wait_s: float = 8.0, below_cores: float = 0.3, window_s: float = 0.5) -> float:
    """Wait (up to max_wait_s) until the machine's CPU use over window_s is under below_cores.

    Other work on a shared machine competes with the benchmark for the same cores; returns the
    background load (cores busy) seen in the last window.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        b0 = system_busy_s()
        time.sleep(window_s)
        busy = (system_busy_s() - b0) / window_s
        if busy < below_cores or time.monotonic() >= deadline:
            return busy


def self_cpu_s() -> float:
    """This process's CPU seconds (all threads, user + system)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def fd_counts() -> dict[str, int]:
    """Open file descriptors of this process: all of them, and how many are sockets."""
    fds = os.listdir("/proc/self/fd")
    sockets = 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                sockets += 1
        except OSError:
            pass  # the fd listdir itself used, already closed
    return {"fds": len(fds), "sockets": sockets}


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    k = (len(s) - 1) * p
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 0.5)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells[1:]]
    return "\n".join(out)


def write_json(name: str, data: Any) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / name
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path
