"""Settings of the cluster scripts, each read from one ``RAYWASTE_*`` environment variable.

Site-specific values (modules, virtual environment, login host, temp root) and the
tunables of the start and stop steps live here with their units and defaults, so a
job script changes behaviour by exporting a variable, never by editing code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from raywaste.cluster.errors import ClusterError

# Launchers that start a command on another node of the job.
LAUNCHERS = ("pbsdsh", "pbs_tmrsh", "ssh", "srun")

# Linux hands out ephemeral ports from 32768 (net.ipv4.ip_local_port_range), and Ray's
# own defaults (6379, 8265, 10001, 52365) lie outside 20000-32767, so job ports derived
# from this range collide with neither.
DEFAULT_PORT_MIN = 20000
DEFAULT_PORT_MAX = 32767


@dataclass(frozen=True)
class ClusterSettings:
    """Tunables of start and stop. The field comments name the environment variable."""

    head_timeout_s: float = 180.0  # RAYWASTE_HEAD_TIMEOUT_S: max wait for `ray start --head`
    wait_timeout_s: float = 300.0  # RAYWASTE_WAIT_TIMEOUT_S: max wait for the workers to join
    wait_interval_s: float = 2.0  # RAYWASTE_WAIT_INTERVAL_S: pause between checks
    start_attempts: int = 2  # RAYWASTE_START_ATTEMPTS: starts of a worker before the start fails
    stop_timeout_s: float = 30.0  # RAYWASTE_STOP_TIMEOUT_S: max wait for one node to stop
    stop_grace_s: float = 3.0  # RAYWASTE_STOP_GRACE_S: wait after SIGTERM before SIGKILL
    port_min: int = DEFAULT_PORT_MIN  # RAYWASTE_PORT_MIN: lowest port a job may use
    port_max: int = DEFAULT_PORT_MAX  # RAYWASTE_PORT_MAX: highest port a job may use
    port_attempts: int = 8  # RAYWASTE_PORT_ATTEMPTS: port blocks tried when one is busy
    tmp_root: str = "/tmp"  # RAYWASTE_TMP_ROOT: node-local folder for Ray's temp dir
    job_dir: str = ""  # RAYWASTE_JOB_DIR: shared private folder; default below the submit dir
    launcher: str = ""  # RAYWASTE_LAUNCHER: one of LAUNCHERS; default from the scheduler
    num_cpus: int | None = None  # RAYWASTE_NUM_CPUS: CPUs per node; default from the allocation
    num_gpus: int | None = None  # RAYWASTE_NUM_GPUS: GPUs per node; default from the allocation
    object_store_mb: int | None = None  # RAYWASTE_OBJECT_STORE_MB: per node; default Ray's
    login_host: str = ""  # RAYWASTE_LOGIN_HOST: host for the ssh tunnel; default the qsub host
    modules: str = ""  # RAYWASTE_MODULES: modules every node loads, separated by spaces
    module_init: str = ""  # RAYWASTE_MODULE_INIT: script that defines `module` if missing
    venv: str = ""  # RAYWASTE_VENV: virtual environment every node activates

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ClusterSettings:
        """Read the settings from ``environ``; unset or empty variables keep the defaults."""
        defaults = cls()
        settings = cls(
            head_timeout_s=_number(environ, "RAYWASTE_HEAD_TIMEOUT_S", defaults.head_timeout_s),
            wait_timeout_s=_number(environ, "RAYWASTE_WAIT_TIMEOUT_S", defaults.wait_timeout_s),
            wait_interval_s=_number(environ, "RAYWASTE_WAIT_INTERVAL_S", defaults.wait_interval_s),
            start_attempts=int(_number(environ, "RAYWASTE_START_ATTEMPTS", defaults.start_attempts)),
            stop_timeout_s=_number(environ, "RAYWASTE_STOP_TIMEOUT_S", defaults.stop_timeout_s),
            stop_grace_s=_number(environ, "RAYWASTE_STOP_GRACE_S", defaults.stop_grace_s),
            port_min=int(_number(environ, "RAYWASTE_PORT_MIN", defaults.port_min)),
            port_max=int(_number(environ, "RAYWASTE_PORT_MAX", defaults.port_max)),
            port_attempts=int(_number(environ, "RAYWASTE_PORT_ATTEMPTS", defaults.port_attempts)),
            tmp_root=environ.get("RAYWASTE_TMP_ROOT") or defaults.tmp_root,
            job_dir=environ.get("RAYWASTE_JOB_DIR", ""),
            launcher=environ.get("RAYWASTE_LAUNCHER", ""),
            num_cpus=_optional_int(environ, "RAYWASTE_NUM_CPUS"),
            num_gpus=_optional_int(environ, "RAYWASTE_NUM_GPUS"),
            object_store_mb=_optional_int(environ, "RAYWASTE_OBJECT_STORE_MB"),
            login_host=environ.get("RAYWASTE_LOGIN_HOST", ""),
            modules=environ.get("RAYWASTE_MODULES", ""),
            module_init=environ.get("RAYWASTE_MODULE_INIT", ""),
            venv=environ.get("RAYWASTE_VENV", ""),
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ClusterError on values that cannot work, naming the variable."""
        if self.launcher and self.launcher not in LAUNCHERS:
            raise ClusterError(
                f"invalid RAYWASTE_LAUNCHER={self.launcher!r}: use one of {', '.join(LAUNCHERS)}"
            )
        if not 1024 <= self.port_min < self.port_max <= 65535:
            raise ClusterError(
                f"invalid port range RAYWASTE_PORT_MIN={self.port_min} RAYWASTE_PORT_MAX={self.port_max}: "
                "use 1024 <= min < max <= 65535"
            )
        for name, value in (
            ("RAYWASTE_HEAD_TIMEOUT_S", self.head_timeout_s),
            ("RAYWASTE_WAIT_TIMEOUT_S", self.wait_timeout_s),
            ("RAYWASTE_WAIT_INTERVAL_S", self.wait_interval_s),
            ("RAYWASTE_STOP_TIMEOUT_S", self.stop_timeout_s),
            ("RAYWASTE_STOP_GRACE_S", self.stop_grace_s),
            ("RAYWASTE_PORT_ATTEMPTS", self.port_attempts),
            ("RAYWASTE_START_ATTEMPTS", self.start_attempts),
        ):
            if value <= 0:
                raise ClusterError(f"invalid {name}={value}: it must be greater than 0")
        for name, count in (("RAYWASTE_NUM_CPUS", self.num_cpus), ("RAYWASTE_NUM_GPUS", self.num_gpus)):
            if count is not None and count < 0:
                raise ClusterError(f"invalid {name}={count}: it must be 0 or more")


def _number(environ: Mapping[str, str], name: str, default: float) -> float:
    text = environ.get(name, "")
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        raise ClusterError(f"invalid {name}={text!r}: expected a number") from None


def _optional_int(environ: Mapping[str, str], name: str) -> int | None:
    text = environ.get(name, "")
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ClusterError(f"invalid {name}={text!r}: expected a whole number") from None
