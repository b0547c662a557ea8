# Start this job's Ray cluster and point the current shell at it.
#
# Usage, inside a PBS or Slurm job script on the job's first node:
#   source "$RAYWASTE_REPO/cluster/start-ray.sh"
#
# It starts the Ray head here and one worker on every other node of $PBS_NODEFILE
# (or $SLURM_JOB_NODELIST), waits until all have joined, then exports RAY_ADDRESS,
# RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH, RAYWASTE_DASHBOARD_URL and RAYWASTE_JOB_DIR.
# The same variables are in $RAYWASTE_JOB_DIR/ray.env for other shells. An EXIT trap
# stops this job's Ray processes on every node when the job script ends; SIGTERM
# (qdel, walltime) ends the script so that the trap runs. The trap replaces any EXIT
# trap set before. The RAYWASTE_* variables it reads are listed in docs/cluster.md.

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    echo "usage: source ${0} (from a job script; running it would lose the exported variables)" >&2
    exit 2
fi

RAYWASTE_CLUSTER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=cluster/site-env.sh
source "$RAYWASTE_CLUSTER_DIR/site-env.sh"
raywaste_load_site_env || return 1

raywaste_stop_ray() {
    "$RAYWASTE_CLUSTER_DIR/stop-ray.sh" "$RAYWASTE_JOB_DIR" || raywaste_warn "stopping the Ray cluster failed; see the log above"
}

_raywaste_env_file="$(python3 -m raywaste.cluster start --node-script "$RAYWASTE_CLUSTER_DIR/ray-node.sh")" || return 1
# shellcheck disable=SC1090
source "$_raywaste_env_file"
unset _raywaste_env_file
trap raywaste_stop_ray EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
