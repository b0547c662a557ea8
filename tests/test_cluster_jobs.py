"""The real cluster and job scripts on a simulated PBS allocation on this machine.

Each simulated node is a loopback address (127.0.0.2, 127.0.0.3, ...), which Linux
routes without configuration. A ``pbsdsh`` stand-in on PATH runs the command for node
index i with that node's entry of $PBS_NODEFILE and its own TMPDIR. Like PBS's task
manager, it starts the command in a clean environment, so the node script has to load
the virtual environment itself. Job ids are random per run, so the ports (derived from the job id)
and temp dirs of a run do not meet those of other runs on the machine.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from raywaste.cluster.ports import derive_ports
from raywaste.cluster.settings import DEFAULT_PORT_MAX, DEFAULT_PORT_MIN

REPO = Path(__file__).resolve().parents[1]
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
UNREACHABLE_HOST = "127.0.0.5"
NCPUS = 2
# Consecutive job numbers get consecutive port blocks; this run's jobs use JOB_BASE + 0..3.
JOB_BASE = random.randrange(10_000, 90_000)
START_TIMEOUT_S = 420

PBSDSH_STAND_IN = r"""#!/usr/bin/env bash
# pbsdsh stand-in: pbsdsh -n INDEX [--] PROGRAM [ARGS...]
# Runs PROGRAM for entry INDEX of $PBS_NODEFILE (0-based) with that node's TMPDIR and a
# clean environment. Entries listed in SIM_UNREACHABLE_HOSTS never run the program, and
# those in SIM_FAIL_ONCE_HOSTS fail their first "start" as a broken node would.
set -euo pipefail
if [[ "${1:-}" != "-n" || $# -lt 3 ]]; then
    echo "pbsdsh stand-in: usage: pbsdsh -n INDEX [--] PROGRAM [ARGS...]" >&2
    exit 2
fi
index="$2"
shift 2
[[ "${1:-}" == "--" ]] && shift
host="$(sed -n "$((index + 1))p" "$PBS_NODEFILE")"
if [[ -z "$host" ]]; then
    echo "pbsdsh stand-in: no entry $index in $PBS_NODEFILE" >&2
    exit 1
fi
for unreachable in ${SIM_UNREACHABLE_HOSTS:-}; do
    if [[ "$host" == "$unreachable" ]]; then
        while true; do sleep 1; done
    fi
done
node_tmp="$SIM_NODES_DIR/$host"
mkdir -p "$node_tmp"
for failing in ${SIM_FAIL_ONCE_HOSTS:-}; do
    if [[ "$host" == "$failing" && " $* " == *" start "* && ! -e "$node_tmp/failed-once" ]]; then
        touch "$node_tmp/failed-once"
        echo "pbsdsh stand-in: simulated failure of the first start on $host" >&2
        exit 1
    fi
done
exec env -i HOME="$HOME" USER="${USER:-tester}" PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 \
    PBS_JOBID="$PBS_JOBID" PBS_JOBNAME="$PBS_JOBNAME" PBS_NODEFILE="$PBS_NODEFILE" \
    PBS_O_WORKDIR="$PBS_O_WORKDIR" PBS_NODENUM="$index" PBS_TASKNUM="$((index + 1))" \
    NCPUS="$NCPUS" TMPDIR="$node_tmp" "$@"
"""

# A job script that starts the cluster and keeps it running until the test ends the job.
HOLDING_JOB = """\
set -euo pipefail
source "$RAYWASTE_REPO/cluster/start-ray.sh"
echo "READY $RAY_ADDRESS"
while true; do sleep 1; done
"""
# The same, but the cluster comes from jobs/env-check.pbs, whose output goes first.
HOLDING_ENV_CHECK_JOB = """\
source "$RAYWASTE_REPO/jobs/env-check.pbs"
echo "READY $RAY_ADDRESS"
while true; do sleep 1; done
"""


@dataclass
class SimulatedJob:
    job_id: str
    hosts: tuple[str, ...]
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    output: Path | None = None

    @property
    def key(self) -> str:
        return self.job_id.split(".")[0]

    @property
    def job_dir(self) -> Path:
        return self.root / "work" / ".raywaste" / self.key

    @property
    def temp_dirs(self) -> list[Path]:
        return [Path(f"/tmp/rw{self.key}n{index}") for index in range(len(self.hosts))]

    def ray_env(self) -> dict[str, str]:
        """The environment of a driver that sourced the job's ray.env."""
        variables = dict(self.env)
        for line in (self.job_dir / "ray.env").read_text().splitlines():
            match = re.fullmatch(r"export (\w+)=(\S+)", line)
            if match:
                variables[match[1]] = match[2].strip("'")
        return variables


def simulated_job(root: Path, home: Path, hosts: tuple[str, ...], number: int, **extra: str) -> SimulatedJob:
    """Prepare PBS's view of a job: node file, pbsdsh stand-in and PBS_* variables.

    ``home`` replaces the user's home. The jobs of a test run share it, so matplotlib
    builds its font cache once, and the real home with its ~/.ray stays untouched.
    """
    root.mkdir(parents=True, exist_ok=True)
    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_in = bin_dir / "pbsdsh"
    stand_in.write_text(PBSDSH_STAND_IN)
    stand_in.chmod(0o755)
    (root / "work").mkdir(exist_ok=True)

    # Two lines per host, as PBS writes them for mpiprocs=2, so pbsdsh -n must skip lines.
    nodefile = root / "nodefile"
    nodefile.write_text("".join(f"{host}\n{host}\n" for host in hosts))
    job_id = f"{number}.vulcan-pbs"
    env = {
        "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "USER": os.environ.get("USER", "tester"),
        "LANG": "C.UTF-8",
        "PBS_JOBID": job_id,
        "PBS_JOBNAME": "simjob",
        "PBS_NODEFILE": str(nodefile),
        "PBS_O_WORKDIR": str(root / "work"),
        "PBS_O_HOST": "vulcan-login.example",
        "PBS_ENVIRONMENT": "PBS_BATCH",
        "PBS_QUEUE": "test",
        "PBS_NODENUM": "0",
        "PBS_TASKNUM": "1",
        "NCPUS": str(NCPUS),
        "OMP_NUM_THREADS": str(NCPUS),
        "TMPDIR": str(root / "nodes" / hosts[0]),
        "SIM_NODES_DIR": str(root / "nodes"),
        "RAYWASTE_REPO": str(REPO),
        "RAYWASTE_VENV": sys.prefix,
        "RAYWASTE_MODULES": "",
        "RAYWASTE_WORKSPACE": str(root / "workspace"),
        "RAYWASTE_OBJECT_STORE_MB": "100",
        "RAYWASTE_WAIT_TIMEOUT_S": str(START_TIMEOUT_S),
        "RAYWASTE_STOP_TIMEOUT_S": "30",
    }
    env.update(extra)
    (root / "nodes" / hosts[0]).mkdir(parents=True, exist_ok=True)
    return SimulatedJob(job_id=job_id, hosts=hosts, root=root, env=env)


def run_job_script(job: SimulatedJob, script: Path, timeout_s: float) -> subprocess.CompletedProcess:
    """Run a job script to its end, as PBS would on the first node."""
    try:
        return subprocess.run(
            ["bash", str(script)], env=job.env, cwd=job.root / "work",
            capture_output=True, text=True, timeout=timeout_s,
        )
    finally:
        ensure_stopped(job)


def start_holding_job(job: SimulatedJob, script_text: str = HOLDING_JOB) -> None:
    """Start a holding job script in the background and return once its cluster is up."""
    script = job.root / "hold.sh"
    script.write_text(script_text)
    job.output = job.root / "hold.log"
    with open(job.output, "w") as log:
        job.process = subprocess.Popen(
            ["bash", str(script)], env=job.env, cwd=job.root / "work", stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + START_TIMEOUT_S + 60
    while "READY" not in job.output.read_text():
        if job.process.poll() is not None or time.monotonic() > deadline:
            end_holding_job(job)
            pytest.fail(f"job {job.job_id} did not start:\n{job.output.read_text()[-4000:]}")
        time.sleep(1)


def end_holding_job(job: SimulatedJob) -> int | None:
    """End the job as qdel does (SIGTERM), wait for its EXIT trap, and return its exit status."""
    if job.process is None:
        return None
    if job.process.poll() is None:
        job.process.send_signal(signal.SIGTERM)
        try:
            job.process.wait(timeout=180)
        except subprocess.TimeoutExpired:
            job.process.kill()
            job.process.wait()
    ensure_stopped(job)
    return job.process.returncode


def ensure_stopped(job: SimulatedJob) -> None:
    """Stop whatever a failed test left behind, so no Ray processes outlive the test."""
    if leftover_processes(job.key) and (job.job_dir / "plan.json").exists():
        subprocess.run([str(REPO / "cluster" / "stop-ray.sh"), str(job.job_dir)], env=job.env, capture_output=True, timeout=180)


def processes_matching(pattern: re.Pattern, open_files: bool = True) -> list[str]:
    """Return "PID: command line" of the processes whose command line or open files match."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            targets = [os.readlink(fd) for fd in (entry / "fd").iterdir()] if open_files else []
        except OSError:
            continue
        if pattern.search(command) or any(pattern.search(target + " ") for target in targets):
            found.append(f"{entry.name}: {command[:120]}")
    return found


def leftover_processes(key: str) -> list[str]:
    """Return the processes that name or have files open in the job's temp dirs."""
    return processes_matching(re.compile(rf"/tmp/rw{re.escape(key)}n\d+(/|$|\s)"))


def run_driver(job: SimulatedJob, code: str, env: dict[str, str], timeout_s: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=job.root, capture_output=True, text=True, timeout=timeout_s
    )


def http_status(url: str, token: str | None = None, method: str = "GET", body: bytes | None = None) -> int:
    request = urllib.request.Request(url, method=method, data=body)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.fixture(scope="module")
def sim_home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def running_job(tmp_path_factory, sim_home):
    job = simulated_job(tmp_path_factory.mktemp("job-a"), sim_home, HOSTS, JOB_BASE)
    start_holding_job(job, HOLDING_ENV_CHECK_JOB)
    yield job
    end_holding_job(job)
    assert leftover_processes(job.key) == []


# --- tests --------------------------------------------------------------------------


# The module's first test also pays for starting the shared cluster, so it takes minutes.
@pytest.mark.slow
def test_env_check_job_three_nodes(running_job):
    output = running_job.output.read_text()
    for host in HOSTS:
        assert re.search(rf"^node {re.escape(host)}: alive, host \S+, CPU {NCPUS}, GPU 0,", output, re.M), output[-3000:]
        assert re.search(rf"^versions {re.escape(host)}: python 3\.\d+\.\d+, numpy \S+, tensorflow 2\.\d+", output, re.M), output[-3000:]
    assert f"3 nodes alive, CPU {NCPUS * 3:g}, GPU 0" in output

    # Ports follow from the job id, and the tunnel command names them.
    ports = derive_ports(running_job.key, DEFAULT_PORT_MIN, DEFAULT_PORT_MAX)
    plan = json.loads((running_job.job_dir / "plan.json").read_text())
    assert plan["ports"]["gcs"] == ports.gcs
    assert f"{HOSTS[0]}:{ports.gcs}" == running_job.ray_env()["RAY_ADDRESS"]
    note = (running_job.root / "work" / f"simjob.{running_job.key}.dashboard.txt").read_text()
    expected = f"ssh -N -L {ports.dashboard}:{HOSTS[0]}:{ports.dashboard} {running_job.env['USER']}@vulcan-login.example"
    assert expected in note
    assert expected in output


def test_token_private_to_job(running_job):
    token = running_job.job_dir / "token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(running_job.job_dir.stat().st_mode) == 0o700
    env_file = (running_job.job_dir / "ray.env").read_text()
    assert token.read_text() not in env_file
    assert f"RAY_AUTH_TOKEN_PATH={token}" in env_file


def test_dashboard_requires_token(running_job):
    url = running_job.ray_env()["RAYWASTE_DASHBOARD_URL"]
    token = (running_job.job_dir / "token").read_text()
    assert url == f"http://{HOSTS[0]}:{derive_ports(running_job.key, DEFAULT_PORT_MIN, DEFAULT_PORT_MAX).dashboard}"
    assert http_status(f"{url}/api/version") == 401
    assert http_status(f"{url}/api/version", token="not-the-token") == 403
    assert http_status(f"{url}/api/version", token=token) == 200
    job_request = json.dumps({"entrypoint": "touch /tmp/raywaste-should-not-exist"}).encode()
    assert http_status(f"{url}/api/jobs/", method="POST", body=job_request) == 401


def test_driver_without_token_rejected(running_job):
    address = running_job.ray_env()["RAY_ADDRESS"]
    # A clean environment and an empty HOME: no RAY_AUTH_* and no ~/.ray/auth_token.
    env = {"PATH": "/usr/bin:/bin", "HOME": running_job.env["HOME"]}
    code = f"import ray; ray.init(address={address!r}); print('CONNECTED')"
    result = run_driver(running_job, code, env)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "CONNECTED" not in result.stdout
    assert "InvalidAuthToken" in output or "AuthenticationError" in output, output[-3000:]


def test_driver_with_env_file_runs_on_every_node(running_job):
    # STRICT_SPREAD puts each bundle on a different node, so three bundles need all three.
    code = (
        "import ray\n"
        "from ray.util.placement_group import placement_group\n"
        "from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy\n"
        "ray.init()\n"
        "address = {n['NodeID']: n['NodeManagerAddress'] for n in ray.nodes()}\n"
        "group = placement_group([{'CPU': 1}] * 3, strategy='STRICT_SPREAD')\n"
        "ray.get(group.ready(), timeout=120)\n"
        "@ray.remote(num_cpus=1)\n"
        "def node_id():\n"
        "    return ray.get_runtime_context().get_node_id()\n"
        "refs = [node_id.options(scheduling_strategy=PlacementGroupSchedulingStrategy(group, bundle)).remote()\n"
        "        for bundle in range(3)]\n"
        "print('ADDRESSES', sorted(address[node] for node in ray.get(refs)))\n"
        "print('CPUS', sorted((n['NodeManagerAddress'], n['Resources']['CPU']) for n in ray.nodes() if n['Alive']))\n"
    )
    result = run_driver(running_job, code, running_job.ray_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ADDRESSES {sorted(HOSTS)}" in result.stdout
    assert "CPUS " + str([(host, float(NCPUS)) for host in HOSTS]) in result.stdout


def http_json(url: str, token: str):
    request = urllib.request.Request(url)
    request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_dashboard_shows_preprocessing_and_trials(running_job, taco_sample, tmp_path):
    out = tmp_path / "out"
    code = (
        "import ray, raywaste\n"
        "ray.init()\n"
        "print('JOB', ray.get_runtime_context().get_job_id())\n"
        f"raywaste.preprocess({str(taco_sample)!r}, {str(out)!r}, task='binary:Bottle', size=16)\n"
        f"raywaste.tune({str(out)!r}, num_samples=1, max_epochs=1, scheduler='fifo',\n"
        "              search_space={'model': {'conv_blocks': 1, 'filters': 4, 'dense_units': 8}})\n"
    )
    result = run_driver(running_job, code, running_job.ray_env(), timeout_s=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    job_id = re.search(r"^JOB (\w+)$", result.stdout, re.M)[1]
    url = running_job.ray_env()["RAYWASTE_DASHBOARD_URL"]
    token = (running_job.job_dir / "token").read_text()

    # The job page's Ray Data table lists the preprocessing dataset with its operators.
    datasets = http_json(f"{url}/api/data/datasets/{job_id}", token)["datasets"]
    assert datasets, f"no Ray Data dataset for job {job_id}"
    operators = [operator["operator"] for dataset in datasets for operator in dataset["operators"]]
    assert any("MapBatches(process_groups)" in name for name in operators), operators
    assert all(dataset["state"] == "FINISHED" for dataset in datasets), datasets

    # The Actors page lists the Tune trial of this driver's job; Tune runs a function
    # trainable in an actor of its class ImplicitFunc.
    actors = http_json(f"{url}/api/v0/actors?limit=10000&detail=1", token)["data"]["result"]["result"]
    trials = [actor for actor in actors if actor["class_name"] == "ImplicitFunc" and actor["job_id"] == job_id]
    assert len(trials) == 1, sorted({(actor["class_name"], actor["job_id"]) for actor in actors})


@pytest.mark.slow
def test_second_job_survives_first_stop(running_job, tmp_path, sim_home):
    # The worker of job B fails its first start, so B also shows that a failed worker is
    # started again.
    other = simulated_job(tmp_path, sim_home, HOSTS[:2], JOB_BASE + 1, SIM_FAIL_ONCE_HOSTS=HOSTS[1])
    assert other.key != running_job.key
    try:
        start_holding_job(other)
        assert f"worker 1 on {HOSTS[1]} ({HOSTS[1]}) exited with 1 before joining; starting it again" in other.output.read_text()
        ports_a = json.loads((running_job.job_dir / "plan.json").read_text())["ports"]
        ports_b = json.loads((other.job_dir / "plan.json").read_text())["ports"]
        assert not set(ports_a.values()) & set(ports_b.values())

        # End job A as qdel would; its EXIT trap must stop only its own processes,
        # remove their temp dirs and delete the token.
        status = end_holding_job(running_job)
        assert status == 143
        assert leftover_processes(running_job.key) == []
        assert not (running_job.job_dir / "token").exists()
        for temp_dir in running_job.temp_dirs:
            assert not temp_dir.exists()

        # Job B still has both nodes and runs tasks.
        code = (
            "import ray\n"
            "ray.init()\n"
            "print('ALIVE', sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']))\n"
            "print('SUM', sum(ray.get([ray.remote(lambda x: x * 2).remote(i) for i in range(10)])))\n"
        )
        result = run_driver(other, code, other.ray_env())
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"ALIVE {sorted(HOSTS[:2])}" in result.stdout
        assert "SUM 90" in result.stdout
    finally:
        end_holding_job(other)
    assert leftover_processes(other.key) == []


@pytest.mark.slow
def test_unreachable_worker_times_out_naming_it(tmp_path, sim_home):
    job = simulated_job(
        tmp_path, sim_home, (HOSTS[0], UNREACHABLE_HOST), JOB_BASE + 2,
        SIM_UNREACHABLE_HOSTS=UNREACHABLE_HOST, RAYWASTE_WAIT_TIMEOUT_S="10", RAYWASTE_STOP_TIMEOUT_S="5",
    )
    script = job.root / "hold.sh"
    script.write_text(HOLDING_JOB)
    result = run_job_script(job, script, timeout_s=START_TIMEOUT_S)

    assert result.returncode != 0
    assert "READY" not in result.stdout
    assert f"timed out after 10 s waiting for 1 of 2 nodes to join: {UNREACHABLE_HOST} ({UNREACHABLE_HOST})" in result.stderr
    assert leftover_processes(job.key) == []
    # The hanging pbsdsh of the unreachable node was ended too.
    assert processes_matching(re.compile(re.escape(str(job.job_dir))), open_files=False) == []


@pytest.mark.slow
def test_pipeline_job_uses_all_nodes(tmp_path, sim_home, taco_sample):
    out = tmp_path / "out"
    job = simulated_job(
        tmp_path / "sim", sim_home, HOSTS, JOB_BASE + 3,
        TACO_DIR=str(taco_sample), OUT_DIR=str(out), TASK="binary:Bottle", IMAGE_SIZE="32",
        NUM_SAMPLES="3", MAX_EPOCHS="1", CPUS_PER_TRIAL=str(NCPUS), EXTRA_ARGS="--grace-period 1",
    )
    result = run_job_script(job, REPO / "jobs" / "pipeline.pbs", timeout_s=START_TIMEOUT_S + 600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]

    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert (out / "best_model.keras").exists()

    # Every node ran preprocessing (Ray Data) and tuning (Tune trial) tasks.
    for host in HOSTS:
        line = re.search(rf"^tasks {re.escape(host)}: (\d+) \((.*)\)$", result.stdout, re.M)
        assert line, f"no task line for {host}:\n{result.stdout[-3000:]}"
        assert "MapBatches(process_groups)" in line[2], line[0]
        assert "train_trial.train" in line[2], line[0]
    assert leftover_processes(job.key) == []
