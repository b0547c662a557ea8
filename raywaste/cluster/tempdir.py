"""Ray's temp dir on each node: short, node-local and private to the job.

Ray puts its Unix sockets under ``<temp dir>/session_<date>_<time>_<usec>_<pid>/sockets/``,
and Linux limits a socket path to 107 bytes, so the temp dir itself must stay short.
It must also sit on a node-local file system: sockets and the session's log files on
Lustre or NFS fail or slow every node down.
"""

from __future__ import annotations

import os
from pathlib import Path

from raywaste.cluster.errors import ClusterError

# sun_path in struct sockaddr_un has room for 108 bytes including the terminating NUL.
SOCKET_PATH_MAX = 107
# The session part that Ray 2.60 appends, with the largest Linux pid (7 digits).
SESSION_PART = "/session_2025-01-01_00-00-00_000000_4194304/sockets/"
# Longest socket name that Ray 2.60 created in a measured head start was
# "dash_MetricsHead" (16 bytes); 20 leaves room for a few more.
SOCKET_NAME_MAX = 20
TEMP_DIR_MAX = SOCKET_PATH_MAX - len(SESSION_PART) - SOCKET_NAME_MAX

# File system types (as /proc/mounts names them) shared between nodes.
SHARED_FILESYSTEMS = frozenset(
    {
        "beegfs",
        "ceph",
        "cifs",
        "fuse.beegfs",
        "fuse.glusterfs",
        "fuse.sshfs",
        "glusterfs",
        "gpfs",
        "lustre",
        "nfs",
        "nfs4",
        "orangefs",
        "panfs",
        "smb3",
        "wekafs",
    }
)


def node_temp_dir(tmp_root: str, job_key: str, node_index: int) -> Path:
    """Return the temp dir of node ``node_index`` of a job, e.g. ``/tmp/rw1234n0``.

    The node index is part of the name so that nodes sharing a host (two jobs on one
    node, or a test that runs several nodes on one machine) never share a temp dir.
    """
    return Path(tmp_root) / f"rw{job_key}n{node_index}"


def filesystem_type(path: Path, mounts: str) -> str:
    """Return the type of the file system that contains ``path``, given /proc/mounts text.

    ``path`` should be absolute and resolved. The longest mount point above it wins.
    """
    best_point, best_type = "", "unknown"
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best_point):
            best_point, best_type = point, fields[2]
    return best_type


def check_temp_dir(temp_dir: Path, mounts: str | None = None) -> None:
    """Raise ClusterError unless ``temp_dir`` is short enough and on a node-local file system."""
    if not temp_dir.is_absolute():
        raise ClusterError(f"Ray temp dir {temp_dir} is not absolute; set RAYWASTE_TMP_ROOT to an absolute path")
    if len(os.fsencode(temp_dir)) > TEMP_DIR_MAX:
        raise ClusterError(
            f"Ray temp dir {temp_dir} has {len(os.fsencode(temp_dir))} bytes, more than {TEMP_DIR_MAX}: "
            f"Ray's socket paths below it would exceed the {SOCKET_PATH_MAX}-byte Unix socket limit; "
            "set RAYWASTE_TMP_ROOT to a shorter node-local folder such as /tmp"
        )

    if mounts is None:
        mounts = Path("/proc/mounts").read_text()
    # Resolve symbolic links in the part that exists already (/tmp may point elsewhere).
    existing = temp_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    fstype = filesystem_type(existing.resolve() / temp_dir.relative_to(existing), mounts)
    if fstype in SHARED_FILESYSTEMS:
        raise ClusterError(
            f"Ray temp dir {temp_dir} is on a shared {fstype} file system; "
            "set RAYWASTE_TMP_ROOT to a node-local folder such as /tmp"
        )
