"""Find and stop the Ray processes of one node of one job, and nothing else.

``ray stop`` ends every Ray process of the user on the host, including other jobs'
clusters. Instead, a process belongs to a node of this job if its command line names
the node's temp dir or it has a file open below it (every Ray process writes its logs
there, including workers whose process title no longer shows any path), or if its
parent belongs.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from pathlib import Path

from raywaste.cluster.waiting import wait_until

logger = logging.getLogger(__name__)

PROC = Path("/proc")


def _names_dir(text: str, directory: str) -> bool:
    # The directory must end at a path boundary: /tmp/rw12n1 must not match /tmp/rw12n10.
    return re.search(re.escape(directory) + r"(?=/|$|[\s,;:=\"'])", text) is not None


def _uses_dir(pid: int, directory: str) -> bool:
    base = PROC / str(pid)
    try:
        command = (base / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        if _names_dir(command, directory):
            return True
        for descriptor in (base / "fd").iterdir():
            try:
                target = os.readlink(descriptor)
            except OSError:
                continue
            if target == directory or target.startswith(directory + "/"):
                return True
    except OSError:
        # The process ended or belongs to another user.
        return False
    return False


def _parents() -> dict[int, int]:
    parents = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_text = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in brackets may contain spaces; the parent PID follows it.
        fields = stat_text.rsplit(")", 1)[-1].split()
        parents[int(entry.name)] = int(fields[1])
    return parents


def find_node_processes(temp_dir: Path) -> list[int]:
    """Return the PIDs of this user's processes that belong to the node with ``temp_dir``."""
    directory = str(temp_dir)
    parents = _parents()
    own = {os.getpid()}
    pid = os.getpid()
    while pid in parents and pid > 1:
        pid = parents[pid]
        own.add(pid)

    uid = os.getuid()
    members = set()
    for pid in parents:
        if pid in own:
            continue
        try:
            if (PROC / str(pid)).stat().st_uid != uid:
                continue
        except OSError:
            continue
        if _uses_dir(pid, directory):
            members.add(pid)

    # Add descendants, such as the dashboard's forkserver helpers.
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in members and pid not in members | own}
        members |= children
        grew = bool(children)
    return sorted(members)


def _signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def stop_node_processes(temp_dir: Path, timeout_s: float, grace_s: float, interval_s: float = 0.2) -> list[int]:
    """Stop the node's processes: SIGTERM, then SIGKILL for those left after ``grace_s``.

    The grace period is cut to half of ``timeout_s`` if longer, so that SIGKILL has time to act.

    Ray's GCS server and autoscaler monitor outlived SIGTERM by more than 10 s in a
    measured stop (Ray 2.60) and then died by SIGKILL without harm, so the grace period
    is short. In the same stop, ``ray start --block`` drained its node in under a second.

    Returns the PIDs still alive at the end, normally none. Processes that appear
    while the node shuts down (a raylet may start a worker) get their signal on a later pass.
    """
    kill_after = time.monotonic() + min(grace_s, timeout_s / 2)
    terminated: set[int] = set()
    killed: set[int] = set()

    def all_gone() -> bool:
        found = _alive(find_node_processes(temp_dir))
        new = [pid for pid in found if pid not in terminated]
        _signal_all(new, signal.SIGTERM)
        terminated.update(new)
        if time.monotonic() >= kill_after:
            stubborn = [pid for pid in found if pid not in killed]
            _signal_all(stubborn, signal.SIGKILL)
            killed.update(stubborn)
        return not found

    if wait_until(all_gone, timeout_s, interval_s):
        logger.info("stopped %d processes of %s (%d needed SIGKILL)", len(terminated), temp_dir, len(killed))
        return []
    left = _alive(find_node_processes(temp_dir))
    logger.error("processes of %s still alive after %.0f s: %s", temp_dir, timeout_s, left)
    return left
