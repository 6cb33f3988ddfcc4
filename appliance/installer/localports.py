"""The TCP ports that processes of this machine listen on, read from /proc (Linux).

`appliance doctor --local` asks it for the ports of the appliance running here, so that
its own Ray and gateway are not reported as another service holding the appliance's ports.
Only processes the caller may inspect are seen (its own user's, or all as root).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

LISTEN = "0A"  # the TCP state column of /proc/net/tcp for a listening socket


def listening_ports(pids: Iterable[int], proc: Path = Path("/proc")) -> set[int]:
    """Ports on which any of `pids` holds a listening TCP (v4 or v6) socket."""
    inodes: set[int] = set()
    for pid in pids:
        try:
            fds = list((proc / str(pid) / "fd").iterdir())
        except OSError:  # gone, or another user's
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target.endswith("]"):
                inodes.add(int(target[len("socket:[") : -1]))
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
            fields = line.split()
            if len(fields) > 9 and fields[3] == LISTEN and int(fields[9]) in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports
