"""Start and stop one job's Ray cluster: the head on this node, workers through the launcher.

``start_cluster`` runs on the job's first node and returns once every node has joined,
or stops what it started and raises ClusterError naming the nodes that did not.
``start_node`` and ``stop_node`` run on the node they act on. ``stop_cluster`` runs on
the head and reaches the other nodes through the same launcher.
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from raywaste.cluster.allocation import Allocation, read_allocation
from raywaste.cluster.errors import ClusterError
from raywaste.cluster.jobdir import ClusterPlan, JobDir, default_job_dir
from raywaste.cluster.launchers import default_launcher, launch_command, spawn
from raywaste.cluster.ports import busy_ports, choose_ports
from raywaste.cluster.processes import find_node_processes, stop_node_processes
from raywaste.cluster.settings import ClusterSettings
from raywaste.cluster.tempdir import check_temp_dir, node_temp_dir
from raywaste.cluster.waiting import wait_until

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 15


def ray_start_args(plan: ClusterPlan, index: int) -> list[str]:
    """Return the ``ray start`` command line for node ``index`` (0 is the head)."""
    node = plan.nodes[index]
    ray = Path(sys.executable).with_name("ray")
    args = [
        str(ray) if ray.exists() else "ray",
        "start",
        f"--node-ip-address={node.address}",
        f"--num-cpus={plan.num_cpus}",
        f"--num-gpus={plan.num_gpus}",
        f"--temp-dir={node_temp_dir(plan.tmp_root, plan.job_key, index)}",
        f"--dashboard-agent-listen-port={plan.ports.dashboard_agent}",
        "--disable-usage-stats",
    ]
    if plan.object_store_mb:
        args.append(f"--object-store-memory={plan.object_store_mb * 1024 * 1024}")
    if index == 0:
        args += [
            "--head",
            f"--port={plan.ports.gcs}",
            "--include-dashboard=true",
            # The head's own address rather than 0.0.0.0 is enough for the ssh tunnel.
            f"--dashboard-host={node.address}",
            f"--dashboard-port={plan.ports.dashboard}",
            f"--ray-client-server-port={plan.ports.client_server}",
        ]
    else:
        # --block keeps the launcher's task alive, so PBS accounts for the node and ends it with the job.
        args += [f"--address={plan.address}", "--block"]
    return args


def ray_environment(job_dir: JobDir, base: Mapping[str, str]) -> dict[str, str]:
    """Return ``base`` plus the token settings that every Ray process and client needs."""
    environment = dict(base)
    # A RAY_ADDRESS left over from another cluster would redirect `ray start`.
    environment.pop("RAY_ADDRESS", None)
    # Ray 2.60 prefers RAY_AUTH_TOKEN to RAY_AUTH_TOKEN_PATH, so a leftover token would win.
    environment.pop("RAY_AUTH_TOKEN", None)
    environment["RAY_AUTH_MODE"] = "token"
    environment["RAY_AUTH_TOKEN_PATH"] = str(job_dir.token)
    environment["RAY_USAGE_STATS_ENABLED"] = "0"
    return environment


def node_environment(job_dir: JobDir, base: Mapping[str, str], temp_dir: Path) -> dict[str, str]:
    """Return the environment of ``ray start`` on the node whose Ray temp dir is ``temp_dir``.

    TMPDIR moves into the temp dir because the dashboard's multiprocessing forkserver
    puts a Unix socket under TMPDIR, and a long TMPDIR broke it (AF_UNIX path too long).
    Files that tasks write to TMPDIR stay on the node and go when the node stops.
    """
    temp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    environment = ray_environment(job_dir, base)
    environment["TMPDIR"] = str(temp_dir)
    return environment


def make_plan(allocation: Allocation, settings: ClusterSettings, job_dir: JobDir, node_script: Path) -> ClusterPlan:
    """Choose the ports and write down everything the nodes need."""
    return ClusterPlan(
        job_id=allocation.job_id,
        job_key=allocation.key,
        scheduler=allocation.scheduler,
        nodes=allocation.nodes,
        ports=choose_ports(allocation.key, allocation.nodes[0].address, settings),
        num_cpus=allocation.num_cpus,
        num_gpus=allocation.num_gpus,
        tmp_root=settings.tmp_root,
        launcher=settings.launcher or default_launcher(allocation.scheduler),
        job_dir=str(job_dir.path),
        node_script=str(node_script.resolve()),
        object_store_mb=settings.object_store_mb,
        modules=settings.modules,
        module_init=settings.module_init,
        venv=settings.venv,
    )


@dataclass(frozen=True)
class StartedCluster:
    plan: ClusterPlan
    job_dir: JobDir
    dashboard_note: Path  # file with the ssh tunnel command, beside the job output
    tunnel: str  # the ssh tunnel command itself


def start_cluster(environ: Mapping[str, str], node_script: Path) -> StartedCluster:
    """Start the head here and a worker on every other node, and wait until all have joined.

    On failure, stops whatever was started and raises ClusterError.
    """
    # 1. Read the allocation and check that this job's cluster is not running yet.
    settings = ClusterSettings.from_env(environ)
    allocation = read_allocation(environ, settings)
    job_dir = JobDir(Path(settings.job_dir) if settings.job_dir else default_job_dir(allocation.submit_dir, allocation.key))
    head_temp_dir = node_temp_dir(settings.tmp_root, allocation.key, 0)
    if find_node_processes(head_temp_dir):
        raise ClusterError(
            f"the Ray cluster of job {allocation.job_id} is running already (processes use {head_temp_dir}); "
            f"source {job_dir.env_file} to use it"
        )
    check_temp_dir(head_temp_dir)
    job_dir.create()

    # 2. Derive free ports, write the plan that the other nodes read, and a new token.
    plan = make_plan(allocation, settings, job_dir, node_script)
    job_dir.write_plan(plan)
    job_dir.write_site_env(plan)
    job_dir.write_token()
    logger.info(
        "job %s: %d nodes, %d CPUs and %d GPUs each, head %s, ports %s",
        plan.job_id, len(plan.nodes), plan.num_cpus, plan.num_gpus, plan.address, plan.ports,
    )

    try:
        # 3. Start the head, then one worker per other node, and wait for all of them.
        start_head(plan, job_dir, environ, settings)
        launchers = launch_workers(plan, job_dir)
        wait_for_nodes(plan, job_dir, launchers, settings)
    except BaseException:
        logger.error("start of job %s failed; stopping the nodes that did start", plan.job_id)
        stop_cluster(job_dir, settings)
        raise

    # 4. Tell the driver how to connect and the user how to reach the dashboard.
    job_dir.write_env_file(plan)
    login_host = settings.login_host or allocation.submit_host
    note = allocation.submit_dir / f"{allocation.job_name}.{plan.job_key}.dashboard.txt"
    write_dashboard_note(plan, job_dir, note, login_host)
    return StartedCluster(plan=plan, job_dir=job_dir, dashboard_note=note, tunnel=tunnel_command(plan, login_host))


def start_head(plan: ClusterPlan, job_dir: JobDir, environ: Mapping[str, str], settings: ClusterSettings) -> None:
    log_path = job_dir.log("node-0.log")
    logger.info("starting the head on %s (%s); log %s", plan.head.host, plan.head.address, log_path)
    with open(log_path, "ab") as log:
        try:
            result = subprocess.run(
                ray_start_args(plan, 0),
                env=node_environment(job_dir, environ, node_temp_dir(plan.tmp_root, plan.job_key, 0)),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=settings.head_timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise ClusterError(
                f"head on {plan.head.host} did not start within {settings.head_timeout_s:.0f} s; see {log_path}; "
                "raise RAYWASTE_HEAD_TIMEOUT_S if the node is slow"
            ) from None
    if result.returncode != 0:
        raise ClusterError(
            f"head on {plan.head.host} failed to start (ray start exited with {result.returncode}):\n"
            f"{tail(log_path)}"
        )


def run_on_node(plan: ClusterPlan, job_dir: JobDir, index: int, action: str) -> subprocess.Popen[bytes]:
    """Start ``ray-node.sh ACTION`` on worker node ``index`` through the launcher; do not wait."""
    argv = ["/bin/bash", plan.node_script, action, str(job_dir.path), str(index)]
    log_name = f"node-{index}.log" if action == "start" else f"{action}-{index}.log"
    return spawn(launch_command(plan.launcher, plan.nodes[index], argv), job_dir.log(log_name))


def launch_workers(plan: ClusterPlan, job_dir: JobDir) -> dict[int, subprocess.Popen[bytes]]:
    """Start every node but the head; return the launcher processes by node index."""
    launchers = {}
    for index, node in enumerate(plan.nodes[1:], start=1):
        logger.info("starting worker %d on %s (%s) with %s", index, node.host, node.address, plan.launcher)
        launchers[index] = run_on_node(plan, job_dir, index, "start")
    job_dir.write_launchers({index: process.pid for index, process in launchers.items()})
    return launchers


def relaunch_worker(
    plan: ClusterPlan, job_dir: JobDir, launchers: dict[int, subprocess.Popen[bytes]], index: int, settings: ClusterSettings
) -> None:
    """Clear what a failed start left on node ``index`` and start the node again."""
    stopper = run_on_node(plan, job_dir, index, "stop")
    if not wait_until(lambda: stopper.poll() is not None, settings.stop_timeout_s, 0.5):
        _end_process_group(stopper.pid)
    launchers[index] = run_on_node(plan, job_dir, index, "start")
    job_dir.write_launchers({index: process.pid for index, process in launchers.items()})


def wait_for_nodes(
    plan: ClusterPlan,
    job_dir: JobDir,
    launchers: dict[int, subprocess.Popen[bytes]],
    settings: ClusterSettings,
) -> None:
    """Wait until every node of the plan is alive in the cluster.

    A worker whose launcher exits before the node joined is started again, up to
    ``settings.start_attempts`` starts in all; after that, ClusterError names the node and
    shows the end of its log. After ``settings.wait_timeout_s``, ClusterError names every
    node still missing.
    """
    # Ray reads RAY_AUTH_MODE when it is first imported, so set it before.
    os.environ.update(ray_environment(job_dir, {}))
    import ray

    try:
        ray.init(address=plan.address, logging_level=logging.WARNING, log_to_driver=False)
    except ConnectionError as error:
        raise ClusterError(f"cannot connect to the head at {plan.address}: {error}; see {job_dir.log('node-0.log')}") from None
    missing: list[int] = []
    starts = dict.fromkeys(launchers, 1)

    def all_joined() -> bool:
        alive = {node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]}
        missing[:] = [index for index, node in enumerate(plan.nodes) if node.address not in alive]
        for index in missing:
            launcher = launchers.get(index)
            if launcher is None or launcher.poll() is None:
                continue
            node = plan.nodes[index]
            log_path = job_dir.log(f"node-{index}.log")
            if starts[index] >= settings.start_attempts:
                raise ClusterError(
                    f"node {node.host} ({node.address}) failed to join: its {plan.launcher} exited with "
                    f"{launcher.returncode} on start {starts[index]} of {settings.start_attempts}. "
                    f"Last lines of {log_path}:\n{tail(log_path)}"
                )
            logger.warning(
                "worker %d on %s (%s) exited with %d before joining; starting it again. Last lines of %s:\n%s",
                index, node.host, node.address, launcher.returncode, log_path, tail(log_path, 3),
            )
            relaunch_worker(plan, job_dir, launchers, index, settings)
            starts[index] += 1
        return not missing

    try:
        if not wait_until(all_joined, settings.wait_timeout_s, settings.wait_interval_s):
            names = ", ".join(f"{plan.nodes[index].host} ({plan.nodes[index].address})" for index in missing)
            raise ClusterError(
                f"timed out after {settings.wait_timeout_s:.0f} s waiting for {len(missing)} of "
                f"{len(plan.nodes)} nodes to join: {names}. Their logs are in {job_dir.log('')}; "
                "raise RAYWASTE_WAIT_TIMEOUT_S if nodes start slowly"
            )
        logger.info("all %d nodes joined %s", len(plan.nodes), plan.address)
    finally:
        ray.shutdown()


def start_node(job_dir: JobDir, index: int) -> None:
    """Check this node and replace this process with ``ray start --block`` for node ``index``."""
    plan = job_dir.read_plan()
    if not 0 < index < len(plan.nodes):
        raise ClusterError(f"invalid node index {index}: the plan has worker nodes 1 to {len(plan.nodes) - 1}")
    node = plan.nodes[index]
    job_dir.check_token()
    check_temp_dir(node_temp_dir(plan.tmp_root, plan.job_key, index))
    busy = busy_ports(node.address, (plan.ports.dashboard_agent,))
    if busy:
        raise ClusterError(f"port {busy[0]} is busy on {node.host} ({node.address}); another job may use it")

    args = ray_start_args(plan, index)
    environment = node_environment(job_dir, os.environ, node_temp_dir(plan.tmp_root, plan.job_key, index))
    logger.info("node %d (%s, %s) joins %s", index, node.host, node.address, plan.address)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(args[0], args, environment)


def stop_node(plan: ClusterPlan, index: int, settings: ClusterSettings) -> list[int]:
    """Stop this node's Ray processes of the job and delete its temp dir; return PIDs left alive."""
    temp_dir = node_temp_dir(plan.tmp_root, plan.job_key, index)
    left = stop_node_processes(temp_dir, settings.stop_timeout_s, settings.stop_grace_s)
    if not left:
        shutil.rmtree(temp_dir, ignore_errors=True)
    return left


def stop_cluster(job_dir: JobDir, settings: ClusterSettings) -> list[str]:
    """Stop the job's Ray processes on every node, then delete the token.

    Returns one line per node that did not stop cleanly; empty when all did.
    """
    plan = job_dir.read_plan()
    problems = []

    # 1. Ask every worker node to stop its own processes, all at once.
    stoppers = {index: run_on_node(plan, job_dir, index, "stop") for index in range(1, len(plan.nodes))}
    wait_until(lambda: all(p.poll() is not None for p in stoppers.values()), settings.stop_timeout_s, 0.5)
    for index, stopper in stoppers.items():
        node = plan.nodes[index]
        if stopper.poll() is None:
            _end_process_group(stopper.pid)
            problems.append(f"node {node.host} ({node.address}): stop timed out after {settings.stop_timeout_s:.0f} s")
        elif stopper.returncode != 0:
            problems.append(f"node {node.host} ({node.address}): stop exited with {stopper.returncode}, see {job_dir.log(f'stop-{index}.log')}")

    # 2. Stop the head here.
    left = stop_node(plan, 0, settings)
    if left:
        problems.append(f"head {plan.head.host} ({plan.head.address}): processes {left} still alive")

    # 3. End worker launchers that are still running, such as one whose node never started.
    for index, pid in job_dir.read_launchers().items():
        if _is_launcher_of(pid, job_dir):
            logger.info("ending the launcher of node %d (PID %d)", index, pid)
            _end_process_group(pid)

    # 4. The token must not outlive the cluster it guards.
    job_dir.token.unlink(missing_ok=True)
    for problem in problems:
        logger.error("%s", problem)
    logger.info("stopped the Ray cluster of job %s", plan.job_id)
    return problems


def tunnel_command(plan: ClusterPlan, login_host: str) -> str:
    """Return the ssh command that forwards the dashboard port from a laptop through the login node."""
    user = os.environ.get("USER") or getpass.getuser()
    port = plan.ports.dashboard
    return f"ssh -N -L {port}:{plan.head.address}:{port} {user}@{login_host or 'LOGIN_HOST'}"


def write_dashboard_note(plan: ClusterPlan, job_dir: JobDir, note: Path, login_host: str) -> None:
    """Write the tunnel command and how to log in to the dashboard to ``note``."""
    port = plan.ports.dashboard
    note.write_text(
        f"# Ray dashboard of job {plan.job_id}, head {plan.head.host} ({plan.head.address}).\n"
        "# 1. On your laptop, open the tunnel and keep it running:\n"
        f"{tunnel_command(plan, login_host)}\n"
        f"# 2. Open http://localhost:{port} and paste the token when the dashboard asks for it.\n"
        f"#    Print it on the login node with: cat {job_dir.token}\n"
        "#    The token is deleted when the job ends.\n"
    )


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} not readable)"
    return "\n".join(text.splitlines()[-lines:])


def _is_launcher_of(pid: int, job_dir: JobDir) -> bool:
    # The PID may have been reused since; only a process that names the job dir is ours.
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return str(job_dir.path) in command


def _end_process_group(pid: int) -> None:
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            return
        if wait_until(lambda: not Path(f"/proc/{pid}").exists() or _is_zombie(pid), 5.0, 0.2):
            return


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True
