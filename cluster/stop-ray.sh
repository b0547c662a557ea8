#!/usr/bin/env bash
# Stop the Ray cluster of one job on every node, and only that job's processes.
set -euo pipefail

usage() {
    cat <<USAGE
usage: ${0##*/} [JOB_DIR]

Stops the Ray processes of the job whose job directory is JOB_DIR (default:
\$RAYWASTE_JOB_DIR, which start-ray.sh exports) on every node, removes their temp
dirs and deletes the job's token. Other jobs' Ray clusters on the same nodes keep
running. start-ray.sh calls this from its EXIT trap.
USAGE
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
fi
job_dir="${1:-${RAYWASTE_JOB_DIR:-}}"
if [[ -z "$job_dir" ]]; then
    usage >&2
    exit 2
fi
if [[ ! -f "$job_dir/plan.json" ]]; then
    echo "${0##*/}: no cluster plan in $job_dir; nothing to stop" >&2
    exit 0
fi

cluster_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=cluster/site-env.sh
source "$cluster_dir/site-env.sh"
raywaste_load_job_site_env "$job_dir"
exec python3 -m raywaste.cluster stop --job-dir "$job_dir"
