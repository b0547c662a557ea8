# Load the site's modules and the virtual environment that raywaste runs from.
#
# Sourced by the job scripts on the head node and by ray-node.sh on every other node,
# so that all nodes run the same Python, Ray and TensorFlow. It reads:
#   RAYWASTE_MODULES      modules to load, separated by spaces; empty loads none
#   RAYWASTE_MODULE_INIT  script that defines `module` where a non-login shell lacks it
#                         (default /etc/profile.d/modules.sh)
#   RAYWASTE_VENV         virtual environment to activate; empty keeps the current python3

raywaste_warn() {
    echo "${0##*/}: $*" >&2
}

raywaste_load_site_env() {
    if [[ -n "${RAYWASTE_MODULES:-}" ]]; then
        if ! type module >/dev/null 2>&1; then
            local init="${RAYWASTE_MODULE_INIT:-/etc/profile.d/modules.sh}"
            if [[ ! -r "$init" ]]; then
                raywaste_warn "the module command is missing and $init is not readable; set RAYWASTE_MODULE_INIT"
                return 1
            fi
            # shellcheck disable=SC1090
            source "$init"
        fi
        # Word splitting is intended: one argument per module.
        # shellcheck disable=SC2086
        module load $RAYWASTE_MODULES || {
            raywaste_warn "module load $RAYWASTE_MODULES failed on $(hostname)"
            return 1
        }
    fi

    if [[ -n "${RAYWASTE_VENV:-}" ]]; then
        if [[ ! -r "$RAYWASTE_VENV/bin/activate" ]]; then
            raywaste_warn "virtual environment $RAYWASTE_VENV not found on $(hostname); set RAYWASTE_VENV"
            return 1
        fi
        # shellcheck disable=SC1091
        source "$RAYWASTE_VENV/bin/activate"
    fi

    if ! python3 -c 'import raywaste.cluster' 2>/dev/null; then
        raywaste_warn "python3 ($(command -v python3 || echo missing)) on $(hostname) cannot import raywaste;" \
            "install it into the virtual environment with: pip install -e ."
        return 1
    fi
}

# Load the site environment recorded for a job in JOB_DIR/site.env, as the start wrote it,
# so that every node and the stop run the same Python as the head.
raywaste_load_job_site_env() {
    local job_dir="$1"
    if [[ ! -r "$job_dir/site.env" ]]; then
        raywaste_warn "$job_dir/site.env not readable on $(hostname); the job directory must be on a file system all nodes share"
        return 1
    fi
    # shellcheck disable=SC1091
    source "$job_dir/site.env"
    raywaste_load_site_env
}
