"""The cluster scripts' parts without a Ray cluster: allocation, ports, temp dirs, job
directory, launchers, process matching and report formatting."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raywaste.cluster import ClusterError
from raywaste.cluster.allocation import Node, first_lines_of_hosts, job_key, read_allocation
from raywaste.cluster.jobdir import ClusterPlan, JobDir
from raywaste.cluster.launchers import launch_command
from raywaste.cluster.lifecycle import ray_start_args
from raywaste.cluster.ports import PORTS_PER_JOB, JobPorts, busy_ports, choose_ports, derive_ports
from raywaste.cluster.processes import find_node_processes, stop_node_processes
from raywaste.cluster.report import node_lines, task_lines
from raywaste.cluster.settings import ClusterSettings
from raywaste.cluster.tempdir import TEMP_DIR_MAX, check_temp_dir, filesystem_type, node_temp_dir
from raywaste.cluster.waiting import wait_until

MOUNTS = """\
/dev/vda1 / ext4 rw,relatime 0 0
tmpfs /tmp tmpfs rw,nosuid,nodev 0 0
10.1.0.1@o2ib:/lus /lustre lustre rw,flock 0 0
server:/home /home nfs4 rw 0 0
/dev/vdb /lus ext4 rw 0 0
"""


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]


def pbs_environ(tmp_path: Path, lines: list[str], **extra: str) -> dict[str, str]:
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("".join(f"{line}\n" for line in lines))
    environ = {
        "PBS_JOBID": "1234.vulcan-pbs",
        "PBS_JOBNAME": "check",
        "PBS_NODEFILE": str(nodefile),
        "PBS_O_WORKDIR": str(tmp_path),
        "PBS_O_HOST": "login1",
        "NCPUS": "8",
    }
    environ.update(extra)
    return environ


def sample_plan(job_dir: Path) -> ClusterPlan:
    return ClusterPlan(
        job_id="1234.vulcan-pbs",
        job_key="1234",
        scheduler="pbs",
        nodes=(Node("n1", "10.0.0.1", 0), Node("n2", "10.0.0.2", 2)),
        ports=JobPorts.from_base(24936),
        num_cpus=8,
        num_gpus=1,
        tmp_root="/tmp",
        launcher="pbsdsh",
        job_dir=str(job_dir),
        node_script="/repo/cluster/ray-node.sh",
        object_store_mb=512,
    )


# --- allocation ---------------------------------------------------------------------


def test_node_file_hosts_keep_order_and_first_line():
    lines = ["n3", "n3", "", "n1", "n1", "n2", "n3"]
    assert first_lines_of_hosts(lines) == [("n3", 0), ("n1", 3), ("n2", 5)]


@pytest.mark.parametrize(
    ("job_id", "key"),
    [("1234.vulcan-pbs", "1234"), ("1234[7].vulcan-pbs", "1234_7"), ("987", "987"), ("55.server.domain", "55")],
)
def test_job_key_forms(job_id, key):
    assert job_key(job_id) == key


def test_job_key_rejects_empty():
    with pytest.raises(ClusterError, match="invalid job id"):
        job_key(".server")


def test_pbs_allocation_read(tmp_path):
    environ = pbs_environ(tmp_path, ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"], CUDA_VISIBLE_DEVICES="0,1")
    allocation = read_allocation(environ, ClusterSettings())
    assert allocation.scheduler == "pbs"
    assert allocation.key == "1234"
    assert allocation.nodes == (Node("127.0.0.2", "127.0.0.2", 0), Node("127.0.0.3", "127.0.0.3", 2))
    assert allocation.num_cpus == 8
    assert allocation.num_gpus == 2
    assert allocation.submit_dir == tmp_path
    assert allocation.submit_host == "login1"


def test_allocation_settings_override_resources(tmp_path):
    environ = pbs_environ(tmp_path, ["127.0.0.2"], NGPUS="4")
    allocation = read_allocation(environ, ClusterSettings(num_cpus=3))
    assert allocation.num_cpus == 3
    assert allocation.num_gpus == 4


def test_allocation_without_ncpus_names_the_fix(tmp_path):
    environ = pbs_environ(tmp_path, ["127.0.0.2"])
    del environ["NCPUS"]
    with pytest.raises(ClusterError, match="RAYWASTE_NUM_CPUS"):
        read_allocation(environ, ClusterSettings())


def test_allocation_outside_a_job():
    with pytest.raises(ClusterError, match="not inside a batch job"):
        read_allocation({"NCPUS": "4"}, ClusterSettings())


def test_allocation_rejects_shared_address(tmp_path):
    environ = pbs_environ(tmp_path, ["a", "b"])
    with pytest.raises(ClusterError, match="both resolve to 10.0.0.9"):
        read_allocation(environ, ClusterSettings(), resolve=lambda host: "10.0.0.9")


def test_allocation_unresolvable_host(tmp_path):
    environ = pbs_environ(tmp_path, ["no-such-node.invalid"])
    with pytest.raises(ClusterError, match="cannot resolve node 'no-such-node.invalid'"):
        read_allocation(environ, ClusterSettings())


def test_settings_reject_bad_values():
    with pytest.raises(ClusterError, match="RAYWASTE_LAUNCHER"):
        ClusterSettings.from_env({"RAYWASTE_LAUNCHER": "mpirun"})
    with pytest.raises(ClusterError, match="RAYWASTE_WAIT_TIMEOUT_S='soon'"):
        ClusterSettings.from_env({"RAYWASTE_WAIT_TIMEOUT_S": "soon"})
    with pytest.raises(ClusterError, match="RAYWASTE_PORT_MIN"):
        ClusterSettings.from_env({"RAYWASTE_PORT_MIN": "30000", "RAYWASTE_PORT_MAX": "20000"})


# --- ports --------------------------------------------------------------------------


def test_ports_derived_from_job_number():
    ports = derive_ports("1234", 20000, 32767)
    blocks = (32767 - 20000 + 1) // PORTS_PER_JOB
    assert ports.gcs == 20000 + (1234 % blocks) * PORTS_PER_JOB
    assert ports.head_ports() == (ports.gcs, ports.gcs + 1, ports.gcs + 2, ports.gcs + 3)
    assert derive_ports("1234", 20000, 32767) == ports


def test_ports_of_consecutive_jobs_differ():
    first = set(derive_ports("5000", 20000, 32767).head_ports())
    second = set(derive_ports("5001", 20000, 32767).head_ports())
    assert not first & second


def test_ports_next_attempt_and_wrap():
    assert derive_ports("7", 20000, 20011, attempt=0).gcs == 20004  # 3 blocks, 7 % 3 = 1
    assert derive_ports("7", 20000, 20011, attempt=1).gcs == 20008
    assert derive_ports("7", 20000, 20011, attempt=2).gcs == 20000


def test_busy_ports_sees_listener():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken_port = listener.getsockname()[1]
        free = free_port()
        assert busy_ports("127.0.0.1", (taken_port, free)) == [taken_port]


def test_busy_ports_sees_wildcard_listener():
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))
        listener.listen()
        taken_port = listener.getsockname()[1]
        assert busy_ports("127.0.0.3", (taken_port,)) == [taken_port]


def test_busy_ports_foreign_address():
    with pytest.raises(ClusterError, match="192.0.2.1 is not on this host"):
        busy_ports("192.0.2.1", (free_port(),))


def test_choose_ports_skips_busy_block():
    settings = ClusterSettings(port_min=20000, port_max=32767)
    first = derive_ports("424242", settings.port_min, settings.port_max)
    if busy_ports("127.0.0.2", first.head_ports()):
        pytest.skip(f"ports {first.head_ports()} are already in use on this machine")
    with socket.socket() as listener:
        listener.bind(("127.0.0.2", first.dashboard))
        listener.listen()
        chosen = choose_ports("424242", "127.0.0.2", settings)
    assert chosen == derive_ports("424242", settings.port_min, settings.port_max, attempt=1)


# --- temp dir -----------------------------------------------------------------------


def test_node_temp_dir_is_short_and_per_node():
    assert node_temp_dir("/tmp", "1234567", 12) == Path("/tmp/rw1234567n12")
    assert node_temp_dir("/tmp", "1234", 1) != node_temp_dir("/tmp", "1234", 2)


def test_filesystem_type_longest_mount():
    assert filesystem_type(Path("/lustre/ws/user"), MOUNTS) == "lustre"
    assert filesystem_type(Path("/lus/x"), MOUNTS) == "ext4"
    assert filesystem_type(Path("/lustreish"), MOUNTS) == "ext4"
    assert filesystem_type(Path("/tmp/rw1n0"), MOUNTS) == "tmpfs"


def test_temp_dir_on_lustre_rejected():
    with pytest.raises(ClusterError, match="shared lustre file system"):
        check_temp_dir(Path("/lustre/rw1n0"), MOUNTS)


def test_temp_dir_too_long_for_sockets():
    long_dir = Path("/tmp") / ("x" * TEMP_DIR_MAX)
    with pytest.raises(ClusterError, match="107-byte Unix socket limit"):
        check_temp_dir(long_dir, MOUNTS)
    check_temp_dir(Path("/tmp/rw1234567n12"), MOUNTS)


# --- job directory and plan ---------------------------------------------------------


def test_job_dir_private_and_token(tmp_path):
    job_dir = JobDir(tmp_path / ".raywaste" / "1234")
    job_dir.create()
    job_dir.write_token()
    first = job_dir.token.read_text()
    assert stat.S_IMODE(job_dir.path.stat().st_mode) == 0o700
    assert stat.S_IMODE(job_dir.path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(job_dir.token.stat().st_mode) == 0o600
    assert len(first) == 64
    job_dir.write_token()
    assert job_dir.token.read_text() != first
    job_dir.check_token()


def test_token_readable_by_others_rejected(tmp_path):
    job_dir = JobDir(tmp_path)
    job_dir.write_token()
    job_dir.token.chmod(0o644)
    with pytest.raises(ClusterError, match="mode 0644"):
        job_dir.check_token()


def test_missing_token_names_shared_filesystem(tmp_path):
    with pytest.raises(ClusterError, match="file system that all nodes share"):
        JobDir(tmp_path).check_token()


def test_plan_round_trip(tmp_path):
    plan = sample_plan(tmp_path)
    job_dir = JobDir(tmp_path)
    job_dir.write_plan(plan)
    assert job_dir.read_plan() == plan
    assert plan.address == "10.0.0.1:24936"
    assert plan.dashboard_url == "http://10.0.0.1:24937"


def test_env_file_sources_in_bash(tmp_path):
    job_dir = JobDir(tmp_path / "job dir")
    job_dir.create()
    job_dir.write_env_file(sample_plan(job_dir.path))
    exported = subprocess.run(
        ["bash", "-c", 'source "$1" && echo "$RAY_ADDRESS|$RAY_AUTH_MODE|$RAY_AUTH_TOKEN_PATH"', "-", str(job_dir.env_file)],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert exported == f"10.0.0.1:24936|token|{job_dir.token}"


# --- commands -----------------------------------------------------------------------


def test_ray_start_args_head(tmp_path):
    args = ray_start_args(sample_plan(tmp_path), 0)
    assert "--head" in args
    assert "--port=24936" in args
    assert "--dashboard-host=10.0.0.1" in args
    assert "--dashboard-port=24937" in args
    assert "--ray-client-server-port=24938" in args
    assert "--dashboard-agent-listen-port=24939" in args
    assert "--node-ip-address=10.0.0.1" in args
    assert "--num-cpus=8" in args
    assert "--num-gpus=1" in args
    assert "--temp-dir=/tmp/rw1234n0" in args
    assert f"--object-store-memory={512 * 1024 * 1024}" in args
    assert "--block" not in args


def test_ray_start_args_worker(tmp_path):
    args = ray_start_args(sample_plan(tmp_path), 1)
    assert "--address=10.0.0.1:24936" in args
    assert "--node-ip-address=10.0.0.2" in args
    assert "--temp-dir=/tmp/rw1234n1" in args
    assert "--block" in args
    assert "--head" not in args


def test_launch_commands():
    node = Node("r1n7", "10.0.0.7", 14)
    argv = ["/bin/bash", "/my repo/ray-node.sh", "start", "/jobs/1", "3"]
    assert launch_command("pbsdsh", node, argv) == ["pbsdsh", "-n", "14", "--", *argv]
    assert launch_command("pbs_tmrsh", node, argv) == ["pbs_tmrsh", "r1n7", *argv]
    assert launch_command("ssh", node, argv)[-1] == "/bin/bash '/my repo/ray-node.sh' start /jobs/1 3"
    assert launch_command("srun", node, argv)[:5] == ["srun", "--nodes=1", "--ntasks=1", "--overlap", "--nodelist=r1n7"]


# --- processes ----------------------------------------------------------------------


def sleeper(*, open_file: Path | None = None, argument: str = "", ignore_term: bool = False) -> subprocess.Popen:
    code = "import signal, sys, time\n"
    if ignore_term:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    if open_file:
        code += f"handle = open({str(open_file)!r}, 'w')\n"
    code += "print('ready', flush=True)\ntime.sleep(120)\n"
    process = subprocess.Popen([sys.executable, "-c", code, argument], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def test_processes_matched_by_open_file_and_argument(tmp_path):
    node_dir = tmp_path / "rw9n1"
    node_dir.mkdir()
    sibling = tmp_path / "rw9n10"
    holder = sleeper(open_file=node_dir / "raylet.out")
    naming = sleeper(argument=f"--temp-dir={node_dir}")
    other = sleeper(argument=f"--temp-dir={sibling}")
    try:
        found = find_node_processes(node_dir)
        assert holder.pid in found
        assert naming.pid in found
        assert other.pid not in found
        assert os.getpid() not in found
    finally:
        for process in (holder, naming, other):
            process.kill()
            process.wait()


def test_stop_escalates_to_sigkill(tmp_path):
    node_dir = tmp_path / "rw9n2"
    node_dir.mkdir()
    stubborn = sleeper(open_file=node_dir / "gcs.out", ignore_term=True)
    try:
        left = stop_node_processes(node_dir, timeout_s=10, grace_s=0.5)
        assert left == []
        assert stubborn.wait(timeout=5) == -signal.SIGKILL
    finally:
        stubborn.kill()
        stubborn.wait()


# --- report and waiting -------------------------------------------------------------


def test_report_lines():
    nodes = [
        {"NodeManagerAddress": "127.0.0.3", "Alive": True, "NodeManagerHostname": "n2",
         "Resources": {"CPU": 2.0, "memory": 2 * 1024**3}, "NodeID": "b"},
        {"NodeManagerAddress": "127.0.0.2", "Alive": False, "NodeManagerHostname": "n1", "Resources": {}, "NodeID": "a"},
    ]
    assert node_lines(nodes) == [
        "node 127.0.0.2: dead, host n1, CPU 0, GPU 0, memory 0.0 GiB",
        "node 127.0.0.3: alive, host n2, CPU 2, GPU 0, memory 2.0 GiB",
    ]
    tasks = [
        {"node_id": "a", "name": "MapBatches(f)", "type": "NORMAL_TASK"},
        {"node_id": "a", "name": "MapBatches(f)", "type": "NORMAL_TASK"},
        {"node_id": "b", "name": "train", "type": "ACTOR_TASK"},
        {"node_id": "b", "name": "driver", "type": "DRIVER_TASK"},
        {"node_id": None, "name": "pending", "type": "NORMAL_TASK"},
    ]
    assert task_lines(tasks, {"a": "127.0.0.2", "b": "127.0.0.3"}) == [
        "tasks 127.0.0.2: 2 (MapBatches(f): 2)",
        "tasks 127.0.0.3: 1 (train: 1)",
    ]


def test_wait_until_true_false_and_raise():
    calls = []
    assert wait_until(lambda: calls.append(1) or len(calls) >= 3, timeout_s=5, interval_s=0.01)
    assert len(calls) == 3

    started = time.monotonic()
    assert not wait_until(lambda: False, timeout_s=0.2, interval_s=0.05)
    assert time.monotonic() - started >= 0.2

    def failing() -> bool:
        raise ClusterError("node n2 failed")

    with pytest.raises(ClusterError, match="node n2 failed"):
        wait_until(failing, timeout_s=5, interval_s=0.01)


def test_driver_example_needs_ray_address(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "examples" / "driver.py"), "taco", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "RAY_ADDRESS is not set" in result.stderr
