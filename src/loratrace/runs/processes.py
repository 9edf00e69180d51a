"""Is the process a record names still running? A pid alone is not enough: pids are reused, so the record keeps the
process's start time as well (Linux's /proc; elsewhere the pid alone decides).

    record = this_process()                # {"host": ..., "pid": ..., "started": ...}: stored by its owner
    alive(record)                          # read by another process on the same host
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": process_start(os.getpid())}


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not taken for the recorded
    process; None when it is gone (or a zombie) or /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]  # a zombie is dead


def alive(record: dict) -> bool:
    """Whether the process `record` names (see `this_process`) runs; True when the record cannot tell (no pid: not
    ours to judge). Only meaningful on the record's own host."""
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:  # kill(0) would ask about our own group
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc").is_dir():
        return True
    started = process_start(pid)
    return started is not None and (record.get("started") is None or started == record.get("started"))


def on_this_host(record: dict) -> bool:
    return record.get("host") == socket.gethostname()
