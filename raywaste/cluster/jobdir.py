"""The job directory: a private folder on a shared file system that every node reads.

It contains the cluster plan (``plan.json``), the per-job token (``token``, mode 0600),
the driver's environment (``ray.env``), the launcher PIDs and the logs of each node's
start. The folder is mode 0700 because the token lets anyone who reads it run code
on the cluster.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from raywaste.cluster.allocation import Node
from raywaste.cluster.errors import ClusterError
from raywaste.cluster.ports import JobPorts

TOKEN_BYTES = 32


@dataclass(frozen=True)
class ClusterPlan:
    """Everything a node needs to join or leave this job's cluster, written by the head."""

    job_id: str
    job_key: str
    scheduler: str
    nodes: tuple[Node, ...]  # head first
    ports: JobPorts
    num_cpus: int  # per node
    num_gpus: int  # per node
    tmp_root: str
    launcher: str
    job_dir: str
    node_script: str  # absolute path of cluster/ray-node.sh
    object_store_mb: int | None = None
    modules: str = ""
    module_init: str = ""
    venv: str = ""

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def address(self) -> str:
        return f"{self.head.address}:{self.ports.gcs}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head.address}:{self.ports.dashboard}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ClusterPlan:
        data = json.loads(text)
        data["nodes"] = tuple(Node(**node) for node in data["nodes"])
        data["ports"] = JobPorts(**data["ports"])
        return cls(**data)


class JobDir:
    """Paths inside one job directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def plan(self) -> Path:
        return self.path / "plan.json"

    @property
    def token(self) -> Path:
        return self.path / "token"

    @property
    def env_file(self) -> Path:
        return self.path / "ray.env"

    @property
    def launchers(self) -> Path:
        return self.path / "launchers.json"

    def log(self, name: str) -> Path:
        return self.path / "logs" / name

    def create(self) -> None:
        """Create the folder and its parent with mode 0700 after checking that the current user owns them."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "logs").mkdir(exist_ok=True)
        for folder in (self.path.parent, self.path, self.path / "logs"):
            info = folder.stat()
            if info.st_uid != os.getuid():
                raise ClusterError(f"job directory {folder} belongs to another user; set RAYWASTE_JOB_DIR elsewhere")
            folder.chmod(0o700)

    def write_token(self) -> None:
        """Write a new random token, readable only by the owner."""
        descriptor = os.open(self.token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(secrets.token_hex(TOKEN_BYTES))

    def check_token(self) -> None:
        """Raise ClusterError unless the token exists and only its owner can read it."""
        try:
            mode = stat.S_IMODE(self.token.stat().st_mode)
        except FileNotFoundError:
            raise ClusterError(
                f"token {self.token} not found on this node; the job directory must be on a file "
                "system that all nodes share (set RAYWASTE_JOB_DIR)"
            ) from None
        if mode & 0o077:
            raise ClusterError(f"token {self.token} has mode {mode:04o}; it must be 0600")

    def write_plan(self, plan: ClusterPlan) -> None:
        self.plan.write_text(plan.to_json())

    def read_plan(self) -> ClusterPlan:
        try:
            return ClusterPlan.from_json(self.plan.read_text())
        except FileNotFoundError:
            raise ClusterError(f"cluster plan {self.plan} not found; was the cluster started with this job dir?") from None

    def write_env_file(self, plan: ClusterPlan) -> None:
        """Write ``ray.env``: the variables a driver needs, to be sourced by a shell."""
        variables = {
            "RAY_ADDRESS": plan.address,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token),
            "RAYWASTE_DASHBOARD_URL": plan.dashboard_url,
            "RAYWASTE_JOB_DIR": str(self.path),
        }
        lines = [f"# Ray cluster of job {plan.job_id}. Source this file before connecting a driver."]
        lines += [f"export {name}={shlex.quote(value)}" for name, value in variables.items()]
        # Ray 2.60 prefers RAY_AUTH_TOKEN to RAY_AUTH_TOKEN_PATH, so a leftover token would win.
        lines.append("unset RAY_AUTH_TOKEN")
        self.env_file.write_text("\n".join(lines) + "\n")

    @property
    def site_env(self) -> Path:
        return self.path / "site.env"

    def write_site_env(self, plan: ClusterPlan) -> None:
        """Write ``site.env``: the modules and virtual environment that ray-node.sh loads on each node."""
        variables = {"RAYWASTE_MODULES": plan.modules, "RAYWASTE_MODULE_INIT": plan.module_init, "RAYWASTE_VENV": plan.venv}
        lines = [f"# Software environment of job {plan.job_id}, loaded on every node before Ray starts."]
        lines += [f"export {name}={shlex.quote(value)}" for name, value in variables.items()]
        self.site_env.write_text("\n".join(lines) + "\n")

    def write_launchers(self, pids: dict[int, int]) -> None:
        """Record the PID of each worker node's launcher process, keyed by node index."""
        self.launchers.write_text(json.dumps({str(index): pid for index, pid in pids.items()}))

    def read_launchers(self) -> dict[int, int]:
        if not self.launchers.exists():
            return {}
        return {int(index): pid for index, pid in json.loads(self.launchers.read_text()).items()}


def default_job_dir(submit_dir: Path, job_key: str) -> Path:
    """Return ``<submit dir>/.raywaste/<job key>``: shared by all nodes on most clusters."""
    return submit_dir / ".raywaste" / job_key
