#!/usr/bin/env python3
"""Container health probe: exit 0 if *this* host runs a live lineguard worker, else 1.

``lineguard health --stage infer`` answers for the whole line: it exits 0 while any infer
worker of the line has a live heartbeat, wherever it runs. That is the right question for an
operator, but the wrong one for a container probe: a hung pod would stay "healthy" as long
as a peer lives, and a new pod would be "ready" before it has loaded its model (so a rolling
update could stop the old pod while the new one is still building its TensorRT engine). This
probe asks ``lineguard health --format json`` for the line's heartbeats and keeps only those written
from this host name (a pod's or a container's own), optionally of one stage.

Usage (installed as ``lineguard-probe`` in the images)::

    lineguard-probe            # any stage: the image's default HEALTHCHECK
    lineguard-probe infer      # Kubernetes liveness/readiness of an infer pod

Settings (``LINEGUARD_REDIS__URL``, ``LINEGUARD_LINE__ID``, ...) come from the environment,
as for the worker itself. Standard library only, so it runs under any Python 3.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

TIMEOUT_S = 20.0


def health_command(stage: str) -> list[str]:
    """The ``lineguard health`` call; ``--stage ''`` requires no stage, so it only reports."""
    return ["lineguard", "--log-level", "error", "health", "--stage", stage, "--format", "json"]


def main(argv: list[str]) -> int:
    stage = argv[1] if len(argv) > 1 else ""
    if stage in ("-h", "--help"):
        print(__doc__)
        return 0
    host = socket.gethostname()
    cmd = health_command(stage)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"probe: could not run {' '.join(cmd)}: {exc}", file=sys.stderr)
        return 1
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        print(f"probe: lineguard health failed: {tail[0]}", file=sys.stderr)
        return 1
    workers = report.get("workers") or []
    mine = [
        w
        for w in workers
        if isinstance(w, dict) and w.get("host") == host and (not stage or w.get("stage") == stage)
    ]
    if mine:
        return 0
    what = f"{stage} worker" if stage else "worker"
    print(
        f"probe: no live {what} heartbeat from host {host} ({len(workers)} heartbeat(s) on "
        "the line); the worker is still starting, has hung or has lost Redis",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
