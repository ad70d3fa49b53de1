# Sourced by the sbatch templates: nesa_run_step LOG COMMAND... runs the job step in the background (its
# output appended to LOG), forwards the stop signals to it, waits for it, and requeues the job after a
# clean stop caused by the time limit.
#
# Slurm sends SIGUSR1 before the time limit (#SBATCH --signal=B:USR1@120) and SIGTERM at preemption;
# either way the step gets SIGUSR1, rank 0 drains the pipeline, commits, and the step exits 75 ("stopped,
# resume me"). After a time-limit stop the job requeues itself (`scontrol requeue`), at most
# NESA_MAX_REQUEUES times (default 10; 0 = never), and the next allocation resumes where this one
# stopped. A preempted job is requeued by Slurm itself (PreemptMode=REQUEUE), as before.
nesa_run_step() {
    local log=$1
    shift
    "$@" >>"$log" 2>&1 &
    local step=$! status=0
    NESA_STOP_SIGNAL=
    trap 'NESA_STOP_SIGNAL=${NESA_STOP_SIGNAL:-USR1}; kill -USR1 "$step" 2>/dev/null' USR1
    trap 'NESA_STOP_SIGNAL=${NESA_STOP_SIGNAL:-TERM}; kill -USR1 "$step" 2>/dev/null' TERM
    while :; do
        wait "$step" && status=0 || status=$?
        kill -0 "$step" 2>/dev/null || break   # still running: the wait was cut short by a signal
    done
    echo "nesa_hpc: exit status $status"
    if [ "$status" = 75 ] && [ "$NESA_STOP_SIGNAL" = USR1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
        local done=${SLURM_RESTART_COUNT:-0} max=${NESA_MAX_REQUEUES:-10}
        if [ "$done" -lt "$max" ]; then
            if scontrol requeue "$SLURM_JOB_ID"; then
                echo "nesa_hpc: stopped before the time limit; requeued ($((done + 1)) of at most $max requeues," \
                    "NESA_MAX_REQUEUES); the next allocation resumes"
            else
                echo "nesa_hpc: scontrol requeue $SLURM_JOB_ID failed; resubmit the same command to resume"
            fi
        else
            echo "nesa_hpc: not requeued: $done requeues done (NESA_MAX_REQUEUES=$max); resubmit to resume"
        fi
    fi
    return "$status"
}
