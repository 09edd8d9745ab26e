"""Start one script as several local JAX processes: ``python -m nlmegen.parallel.launch -n 2 fit.py [args]``.

Each process gets ``NLMEGEN_COORDINATOR=localhost:<port>`` (a free port unless ``--port``),
``NLMEGEN_NUM_PROCESSES`` and its own ``NLMEGEN_PROCESS_ID``; the script calls
`nlmegen.parallel.distributed.initialize` first. The exit status is the first non-zero one of the
processes (the others are stopped then), else 0. Under SLURM use ``srun`` instead (see
`nlmegen.parallel.distributed`).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

from .distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID

__all__ = ["free_port", "launch", "main"]


def free_port() -> int:
    """A TCP port on localhost that is free now (the coordinator's)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(argv: list[str], n: int, port: int | None = None, env: dict | None = None,
           timeout: float | None = None) -> int:
    """Run ``python argv...`` as ``n`` processes of one JAX run; returns the exit status."""
    if n < 1:
        raise ValueError(f"the number of processes must be at least 1, not {n}")
    port = port or free_port()
    base = dict(os.environ if env is None else env)
    procs = []
    for k in range(n):
        child = {**base, ENV_COORDINATOR: f"localhost:{port}", ENV_NUM_PROCESSES: str(n), ENV_PROCESS_ID: str(k)}
        procs.append(subprocess.Popen([sys.executable, *argv], env=child))
    deadline = None if timeout is None else time.monotonic() + timeout
    status = 0
    try:
        while None in (codes := [p.poll() for p in procs]):  # poll every process (not any(): it stops early)
            failed = [c for c in codes if c not in (None, 0)]
            if failed or (deadline is not None and time.monotonic() > deadline):
                status = failed[0] if failed else 124
                break
            time.sleep(0.1)
    finally:
        for p in procs:  # a failed or timed-out run: stop the rest (they would wait for the lost peer)
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return status or next((p.returncode for p in procs if p.returncode), 0)


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nlmegen.parallel.launch", description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--processes", type=int, required=True, help="number of processes")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("script", help="the Python script every process runs")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    ns = parser.parse_args(args)
    return launch([ns.script, *ns.args], ns.processes, ns.port)


if __name__ == "__main__":
    sys.exit(main())
