"""What Linux's /proc says of a process, for tests and benchmarks: its CPU time, whether it
still runs, its children."""

from __future__ import annotations

import os
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat from its third field (state) on; the command name, which may hold spaces
    and parentheses, is cut off at its last ")"."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's body waits for init to reap it)."""
    try:
        return _stat(pid)[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def children(pid: int) -> list[int]:
    """The process's child processes, from every one of its threads."""
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]
