# Sourced by the job scripts in slurm/: `launch key=value ...` starts pipeline/run.py on every node of
# the allocation and survives preemption. Set in the environment (sbatch passes it on):
#   LAUNCHER=torchrun|accelerate  how each node starts its processes (default torchrun)
#   NPROC_PER_NODE                processes per node (default: the node's GPUs in the allocation, else 1)
#   ACCELERATE_CONFIG             accelerate's YAML (default: ds_configs/accelerate_fsdp2.yaml for
#                                 parallel=fsdp2, ds_configs/accelerate_deepspeed.yaml for zero*, none
#                                 (--multi_gpu) for ddp and none)
#   PIPELINE_REPO                 the checkout (default: where sbatch was run, $SLURM_SUBMIT_DIR)
# python is the one on PATH: activate the project's environment before sbatch.
#
# Preemption: the job scripts ask for `--signal=B:USR1@120 --requeue`; USR1 (or TERM) reaches this
# shell only, which touches $PIPELINE_STOP_FILE. Every rank of every node sees the file (run_dir is
# shared), finishes its step, checkpoints, and rank 0 requeues the job; the next start resumes.
# A file and not the signal itself, because torchrun and accelerate die on SIGUSR1.
#
# A failed node: srun waits for the tasks of every node, and a node whose processes vanished (a node
# lost) never reports. So a node whose launcher fails asks the batch shell, through Slurm (USR2), to
# end the step: srun then waits at most KillWait + 2 s more, and the job fails instead of hanging.
set -euo pipefail
cd "${PIPELINE_REPO:-${SLURM_SUBMIT_DIR:-.}}"

# The value of key= in the arguments (the last wins, as in pipeline/run.py), else the default.
arg_value() {
    local key=$1 value=$2 arg
    for arg in "${@:3}"; do [[ $arg == "$key="* ]] && value=${arg#*=}; done
    echo "$value"
}

# On every node (srun starts it once per node): this node's processes, rendezvous on the first node.
start_node() {
    local status=0
    case "$LAUNCHER" in
    torchrun)
        python -m torch.distributed.run --nnodes="$SLURM_NNODES" --node_rank="$SLURM_NODEID" \
            --nproc_per_node="$NPROC_PER_NODE" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" "$@" \
            || status=$? ;;
    accelerate)
        local how=()  # the backend's YAML; without one (parallel=none, ddp) plain processes
        [[ -n $ACCELERATE_CONFIG ]] && how=(--config_file "$ACCELERATE_CONFIG")
        [[ -z $ACCELERATE_CONFIG && $((SLURM_NNODES * NPROC_PER_NODE)) -gt 1 ]] && how=(--multi_gpu)
        python -m accelerate.commands.launch "${how[@]}" \
            --num_machines="$SLURM_NNODES" --machine_rank="$SLURM_NODEID" \
            --num_processes=$((SLURM_NNODES * NPROC_PER_NODE)) --main_process_ip="$MASTER_ADDR" \
            --main_process_port="$MASTER_PORT" --deepspeed_multinode_launcher=standard "$@" || status=$? ;;
    *)
        echo "LAUNCHER=$LAUNCHER: use LAUNCHER=torchrun or LAUNCHER=accelerate" >&2; exit 2 ;;
    esac
    if (( status != 0 )) && (( SLURM_NNODES > 1 )); then
        echo "launch: the processes on $(hostname) ended with status $status; asking the job to end its step" >&2
        scancel --batch --signal=USR2 "$SLURM_JOB_ID" || true
    fi
    exit "$status"
}

# In the batch shell, on USR2 from a failed node: end srun (Slurm's abort: KillWait + 2 s at most).
end_step() {
    [[ -n $srun_pid ]] || return 0
    echo "launch: a node failed; ending the job step"
    kill -TERM "$srun_pid" 2>/dev/null || true
}

# In the batch shell, on USR1 or TERM: ask the ranks to stop (once). The TERM of the requeue that rank 0
# runs after its checkpoint (it marks it first, pipeline/parallel/preemption.py) ends this start: say so with the
# ranks' status, 75, before Slurm kills this shell (KillWait), rather than the step's 143 or nothing.
on_stop_signal() {
    if [[ -e $PIPELINE_STOP_FILE.requeued ]]; then
        rm -f "$PIPELINE_STOP_FILE" "$PIPELINE_STOP_FILE.requeued"
        echo "launch: pipeline/run.py stopped after a checkpoint and requeued the job: exit status 75"
        exit 75
    fi
    [[ -z $stop_asked ]] || return 0
    stop_asked=1
    echo "launch: signal received, asking the ranks to stop"
    mkdir -p "${PIPELINE_STOP_FILE%/*}"
    touch "$PIPELINE_STOP_FILE"
}
launch() {
    [[ -n ${SLURM_JOB_ID:-} ]] || { echo "not in a Slurm job: submit it with sbatch (see slurm/README.md)" >&2; exit 2; }
    export LAUNCHER=${LAUNCHER:-torchrun}
    export NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
    local parallel run_dir
    parallel=$(arg_value parallel none "$@")
    run_dir=$(arg_value run_dir runs/default "$@")  # pipeline/config/schema.py's defaults
    case $parallel in  # accelerate's YAML for the backend (ACCELERATE_CONFIG= for none)
        fsdp2) export ACCELERATE_CONFIG=${ACCELERATE_CONFIG-ds_configs/accelerate_fsdp2.yaml} ;;
        zero*) export ACCELERATE_CONFIG=${ACCELERATE_CONFIG-ds_configs/accelerate_deepspeed.yaml} ;;
        *) export ACCELERATE_CONFIG=${ACCELERATE_CONFIG-} ;;
    esac
    if [[ $LAUNCHER == accelerate && -n $ACCELERATE_CONFIG && ! -f $ACCELERATE_CONFIG ]]; then
        echo "error: ACCELERATE_CONFIG=$ACCELERATE_CONFIG does not exist; give accelerate's YAML (see ds_configs/)" >&2
        exit 2
    fi
    read -r MASTER_ADDR < <(scontrol show hostnames "$SLURM_JOB_NODELIST")  # the first node
    export MASTER_ADDR MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))  # a port per job: jobs may share a node
    # run_dir is made by pipeline/run.py once its checks pass (a failed check leaves nothing behind).
    export PIPELINE_STOP_FILE="$(realpath -m "$run_dir")/stop.$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}"
    stop_asked=""
    trap on_stop_signal USR1 TERM
    srun_pid=""
    trap end_step USR2

    # A job given GPUs runs on them or stops in one line (torch's CUDA and the driver's: device=cuda), never
    # silently on its CPUs as device=auto would where the driver is too old for torch; a device= given wins.
    local device=()
    (( ${SLURM_GPUS_ON_NODE:-0} > 0 )) && device=(device=cuda)
    echo "launch: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_NNODES node(s) x" \
         "$NPROC_PER_NODE process(es), $LAUNCHER, rendezvous $MASTER_ADDR:$MASTER_PORT: pipeline/run.py ${device[*]:+${device[*]} }$*"
    # srun 22.05 does not pass the job's --cpus-per-task on to its tasks by itself.
    export -f start_node
    srun --ntasks-per-node=1 --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} \
        bash -c 'start_node "$@"' start_node pipeline/run.py "${device[@]}" "$@" &
    srun_pid=$!
    local status=0
    # A trapped signal interrupts `wait`; wait again until srun itself has ended, then take its status.
    while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid" || true; done
    wait "$srun_pid" || status=$?
    [[ -e $PIPELINE_STOP_FILE.requeued ]] && status=75  # the step ended before the requeue's TERM came
    rm -f "$PIPELINE_STOP_FILE" "$PIPELINE_STOP_FILE.requeued"
    echo "launch: pipeline/run.py exited with status $status"
    exit "$status"
}
