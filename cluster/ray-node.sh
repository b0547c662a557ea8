#!/usr/bin/env bash
# Start or stop one worker node of a job's Ray cluster; run on that node by the launcher.
set -euo pipefail

usage() {
    cat <<USAGE
usage: ${0##*/} start|stop JOB_DIR INDEX

Run by start-ray.sh and stop-ray.sh through pbsdsh, pbs_tmrsh, ssh or srun on the
node with index INDEX in JOB_DIR/plan.json. Loads the job's modules and virtual
environment from JOB_DIR/site.env first, because a launched task does not inherit
the job script's environment. "start" blocks while the node's Ray runs.
USAGE
}

if [[ $# -ne 3 || ( "$1" != start && "$1" != stop ) ]]; then
    usage >&2
    exit 2
fi
action="$1"
job_dir="$2"
index="$3"

cluster_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=cluster/site-env.sh
source "$cluster_dir/site-env.sh"
raywaste_load_job_site_env "$job_dir"
exec python3 -m raywaste.cluster node "$action" "$job_dir" "$index"
