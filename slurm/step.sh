# Sourced by the sbatch templates: nesa_run_step LOG COMMAND... runs the job step in the background (its
# output appended to LOG), forwards the stop signals to it, waits for it, and requeues the job after a
# clean stop caused by the time limit or after a lost rank.
#
# Slurm sends SIGUSR1 before the time limit (#SBATCH --signal=B:USR1@120) and SIGTERM at preemption;
# either way the step gets SIGUSR1, rank 0 drains the pipeline, commits, and the step exits 75 ("stopped,
# resume me"). After a time-limit stop the job requeues itself (`scontrol requeue`), at most
# NESA_MAX_REQUEUES times (default 10; 0 = never), and the next allocation resumes where this one
# stopped. A preempted job is requeued by Slurm itself (PreemptMode=REQUEUE), as before.
#
# The templates call srun without --kill-on-bad-exit: after a stop every rank exits 75, and with that option
# Slurm kills the ranks still finishing as soon as the first one exits, so the step ends with 137 and is not
# requeued. A rank that dies is noticed by the others within runtime.timeout, and an MPI abort (a user
# error seen by one rank) ends the whole step.
#
# A rank that is lost mid-run (its host died, hung or was cut off) is noticed by the others within
# runtime.timeout: they end the step with the line "a rank was lost; the job can resume (exit 76)". The job
# is then requeued the same way (Slurm itself also requeues a job whose node it declares failed, when that
# comes first), and the next allocation resumes on the hosts Slurm gives it.
#
# A signal that reaches a rank before its interpreter has run the entry script's first line would end it
# the OS's default way (killed by the signal, not exit 75), so a stop signal that arrives while the step
# is younger than NESA_SIGNAL_GRACE seconds (default 5) is forwarded once the step is that old.
nesa_forward_stop() {
    local wait=$((NESA_STEP_START + ${NESA_SIGNAL_GRACE:-5} - SECONDS))
    [ "$wait" -gt 0 ] && sleep "$wait"
    kill -USR1 "$NESA_STEP_PID" 2>/dev/null
}

nesa_run_step() {
    local log=$1
    shift
    NESA_STEP_START=$SECONDS
    local start_bytes
    start_bytes=$(stat -c %s "$log" 2>/dev/null || echo 0)
    "$@" >>"$log" 2>&1 &
    local step=$! status=0
    NESA_STEP_PID=$step
    NESA_STOP_SIGNAL=
    trap 'NESA_STOP_SIGNAL=${NESA_STOP_SIGNAL:-USR1}; nesa_forward_stop' USR1
    trap 'NESA_STOP_SIGNAL=${NESA_STOP_SIGNAL:-TERM}; nesa_forward_stop' TERM
    while :; do
        wait "$step" && status=0 || status=$?
        kill -0 "$step" 2>/dev/null || break   # still running: the wait was cut short by a signal
    done
    echo "nesa_hpc: exit status $status"
    local why=
    if [ "$status" = 75 ] && [ "$NESA_STOP_SIGNAL" = USR1 ]; then
        why="stopped before the time limit"
    elif [ "$status" != 0 ] && tail -c +"$((start_bytes + 1))" "$log" | grep -q "a rank was lost; the job can resume"; then
        why="a rank was lost"
        status=76
    fi
    if [ -n "$why" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
        local done=${SLURM_RESTART_COUNT:-0} max=${NESA_MAX_REQUEUES:-10}
        if [ "$done" -lt "$max" ]; then
            if scontrol requeue "$SLURM_JOB_ID"; then
                echo "nesa_hpc: $why; requeued ($((done + 1)) of at most $max requeues," \
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
