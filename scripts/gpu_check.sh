#!/usr/bin/env bash
# One prepared check of the CUDA code paths on a machine with one NVIDIA GPU (no network needed), under
# 8 minutes. Run from anywhere:
#
#     bash scripts/gpu_check.sh
#
# It finds a Python whose torch sees a GPU (GPU_CHECK_PYTHON, .venv/bin/python, python3, python, conda),
# checks that transformers, h5py, hydra, mpi4py and an mpiexec are there (nothing is installed: the repo
# is put on PYTHONPATH), then, with 1..4 ranks sharing the GPU over the MPI transport
# (runtime.device=cuda, runtime.owner_device=cuda, runtime.transport=mpi):
#   - fp32 exactness against plain transformers on the same GPU: task=score (nll_sum per row vs a forward
#     of each row alone), task=generate (greedy tokens vs model.generate(do_sample=False) per row), and
#     3 training steps (losses equal across world sizes);
#   - bf16 throughput (score tokens/s, generated tokens/s) next to plain transformers batched the same way
#     (score) and transformers' continuous batching on the same GPU (generate; static generate in the note);
#     each generate job also writes its ranks' timeline (runtime.trace) to out/<job>.trace.json;
#   - a one-process MpiTransport self-check (values staged while the producer stream is busy; no
#     whole-stream synchronize in send).
# and prints one table. Exit status: 0 all passed (skipped rows allowed), 1 a check failed, 2 the
# machine lacks what the check needs. Every step has its own timeout, and steps stop being started once
# GPU_CHECK_BUDGET seconds (default 420) have passed, so the whole run stays under 8 minutes.
#
# Environment:
#   GPU_CHECK_DEVICE  cuda (default) | cpu: the same steps on CPU ranks, fewer rows (a dry run of the logic)
#   GPU_CHECK_MODEL   auto (default): the packaged SmolLM2 if it is installed (or already converted under
#                     $NESA_HPC_CACHE), else a random Llama of SmolLM2's shape (cuda) or a tiny one (cpu)
#                     | smollm2 | random (SmolLM2's shape) | tiny (6 layers, hidden 64) | a model folder
#   GPU_CHECK_RANKS   world sizes, default "1 2 3 4" (cuda) or "1 3" (cpu)
#   GPU_CHECK_PYTHON  the Python to use; GPU_CHECK_DIR the work folder (default: a new /tmp folder)
#   GPU_CHECK_BUDGET  seconds after which no new step starts (default 420)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
T0=$SECONDS
DEVICE=${GPU_CHECK_DEVICE:-cuda}
MODEL=${GPU_CHECK_MODEL:-auto}
BUDGET=${GPU_CHECK_BUDGET:-420}
case "$DEVICE" in
    cuda) RANKS=${GPU_CHECK_RANKS:-1 2 3 4}; PROFILE=gpu; BS=16; THREADS=2 ;;
    cpu)  RANKS=${GPU_CHECK_RANKS:-1 3}; PROFILE=cpu; BS=4; THREADS=1 ;;
    *) echo "GPU_CHECK_DEVICE=$DEVICE: use cuda or cpu" >&2; exit 2 ;;
esac
W=${GPU_CHECK_DIR:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$W/steps" "$W/logs" "$W/out"
rm -f "$W"/steps/* "$W/plan.jsonl" "$W"/ref-*.json "$W/transport.json"
say() { echo "[gpu_check $((SECONDS - T0))s] $*"; }

# ------------------------------------------------------------------ a Python with torch (and a GPU)
probe='import sys, torch
ok = torch.cuda.is_available() if sys.argv[1] == "cuda" else True
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__} (CUDA build {torch.version.cuda}), {gpu}")
sys.exit(0 if ok else 3)'
candidates=()
[ -n "${GPU_CHECK_PYTHON:-}" ] && candidates+=("$GPU_CHECK_PYTHON")
if [ "$DEVICE" = cpu ] && [ ! -x .venv/bin/python ] && [ -z "${GPU_CHECK_PYTHON:-}" ]; then
    say "no .venv: running scripts/setup.sh (CPU torch)"
    bash scripts/setup.sh || { echo "scripts/setup.sh failed" >&2; exit 2; }
fi
candidates+=(.venv/bin/python "$(command -v python3 || true)" "$(command -v python || true)" /opt/conda/bin/python
             /usr/local/bin/python3 /usr/bin/python3)
PY=
for c in "${candidates[@]}"; do
    [ -n "$c" ] && [ -x "$c" ] || continue
    if found=$(timeout 120 "$c" -c "$probe" "$DEVICE" 2>/dev/null); then
        PY=$c; say "python: $c: $found"; break
    else
        say "python: $c: ${found:-no torch} (not usable for runtime.device=$DEVICE)"
    fi
done
if [ -z "$PY" ]; then
    echo "gpu_check: no Python here has a torch that can use runtime.device=$DEVICE." >&2
    echo "  Install a CUDA build of torch (this check downloads nothing), or set GPU_CHECK_PYTHON." >&2
    exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # this working tree's nesa_hpc, whatever is installed
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# Open MPI as root, and yielding idle ranks (harmless for MPICH)
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1

if ! mods=$(timeout 120 "$PY" - <<'EOF' 2>&1
import importlib, sys
missing, found = [], []
for name in ("numpy", "transformers", "safetensors", "h5py", "hydra", "omegaconf", "tokenizers", "mpi4py", "peft"):
    try:
        m = importlib.import_module(name)
        found.append(f"{name} {getattr(m, '__version__', '?')}")
    except Exception as exc:
        if name == "peft":  # only training (LoRA) needs it: those rows will fail, the others run
            found.append(f"peft MISSING (the train rows will fail: {exc})")
        else:
            missing.append(f"{name} ({type(exc).__name__}: {exc})")
try:
    import transformers
    if int(transformers.__version__.split(".")[0]) < 5:
        missing.append(f"transformers>=5 (found {transformers.__version__}; nesa_hpc needs 5.x)")
except Exception:
    pass
if "mpi4py (" not in " ".join(missing):
    try:
        from mpi4py import MPI
        found.append("MPI: " + MPI.Get_library_version().splitlines()[0].strip())
    except Exception as exc:
        missing.append(f"mpi4py's MPI library ({exc})")
try:
    import nesa_hpc
    found.append(f"nesa_hpc from {nesa_hpc.__file__}")
except Exception as exc:
    missing.append(f"nesa_hpc ({type(exc).__name__}: {exc})")
print("; ".join(found))
if missing:
    print("missing: " + "; ".join(missing))
    sys.exit(3)
EOF
); then
    echo "gpu_check: $PY lacks what the jobs need:" >&2
    echo "$mods" >&2
    echo "  (no network here: install them into that Python beforehand, e.g. pip install mpi4py mpich h5py" >&2
    echo "   hydra-core transformers safetensors; or point GPU_CHECK_PYTHON at one that has them)" >&2
    exit 2
fi
say "packages: $mods"
MPIEXEC=
for c in "$(dirname "$PY")/mpiexec" "$(command -v mpiexec || true)" "$(command -v mpirun || true)"; do
    [ -n "$c" ] && [ -x "$c" ] && { MPIEXEC=$c; break; }
done
if [ -z "$MPIEXEC" ]; then
    echo "gpu_check: no mpiexec next to $PY or on PATH (pip install mpich gives one)" >&2
    exit 2
fi
say "mpiexec: $MPIEXEC ($("$MPIEXEC" --version 2>&1 | grep -m1 -iE 'version|mpich|open' | tr -s ' ' | cut -c1-80))"
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/[gpu_check] nvidia-smi: /'
fi
say "work folder: $W"

# ------------------------------------------------------------------ steps
# step NAME LIMIT CMD...: run with a timeout, log to logs/NAME.log, record "rc seconds" in steps/NAME.rc;
# once the budget is spent, record steps/NAME.skip instead. A failed step never stops the others.
step() {
    local name=$1 limit=$2 left t rc
    shift 2
    left=$((BUDGET - (SECONDS - T0)))
    if [ "$left" -lt 20 ]; then
        touch "$W/steps/$name.skip"; say "$name: skipped (budget of $BUDGET s spent)"; return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    t=$SECONDS
    timeout -k 10 "$limit" "$@" >"$W/logs/$name.log" 2>&1
    rc=$?
    echo "$rc $((SECONDS - t))" >"$W/steps/$name.rc"
    say "$name: exit $rc in $((SECONDS - t)) s"
}
plan() {  # plan NAME TASK RANKS DTYPE DATA EXACT: what report compares for a job step
    printf '{"name": "%s", "task": "%s", "ranks": %s, "dtype": "%s", "data": "%s", "exact": %s, "output": "%s", "train_dir": "%s"}\n' \
        "$1" "$2" "$3" "$4" "$5" "$6" "$W/out/$1.h5" "$W/out/$1" >>"$W/plan.jsonl"
}
REF=("$PY" scripts/gpu_reference.py)

step prepare 150 "${REF[@]}" prepare "$W" --model "$MODEL" --profile "$PROFILE"
if [ ! -f "$W/prepared.json" ]; then
    tail -20 "$W/logs/prepare.log" >&2
    echo "gpu_check: could not prepare the model and data (log above)" >&2
    exit 2
fi
MODEL_PATH=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["model"])' "$W/prepared.json")
LAYERS=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["num_layers"])' "$W/prepared.json")
GEN_NEW=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["gen_new_tokens"])' "$W/prepared.json")
EXACT_NEW=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["exact_new_tokens"])' "$W/prepared.json")
K=2
say "model: $MODEL_PATH ($LAYERS layers), split.k=$K, ranks: $RANKS"

step transport 60 "$PY" scripts/gpu_reference.py transport "$W" --device "$DEVICE"
step ref-float32 150 "${REF[@]}" reference "$W" --device "$DEVICE" --dtype float32 --batch-size "$BS" \
    --what score-exact,gen-exact,score-speed:exact,gen-speed:exact

common=("model.path=$MODEL_PATH" "runtime.device=$DEVICE" "runtime.owner_device=$DEVICE" "runtime.transport=mpi"
        "runtime.threads=$THREADS" "runtime.timeout=60" "split.k=$K" "data.max_length=128"
        "output.overwrite=true")
job() {  # job NAME RANKS LIMIT SCRIPT OVERRIDES...
    local name=$1 n=$2 limit=$3 script=$4
    shift 4
    step "$name" "$limit" "$MPIEXEC" -n "$n" "$PY" "$script" "${common[@]}" "$@"
}
infer_jobs() {  # infer_jobs RANKS DTYPE TAG CHECK EXACT SCORE_DATA GEN_DATA NEW_TOKENS: score, then generate
    local n=$1 dtype=$2 tag=$3 check=$4 exact=$5 score_data=$6 gen_data=$7 new=$8 name
    name=score-$n-$tag; plan "$name" score "$n" "$dtype" "$check" "$exact"
    job "$name" "$n" 90 jobs/infer.py task=score "model.dtype=$dtype" "data.batch_size=$BS" \
        "data.path=$score_data" "output.path=$W/out/$name.h5"
    name=generate-$n-$tag; plan "$name" generate "$n" "$dtype" "$check" "$exact"
    job "$name" "$n" 90 jobs/infer.py task=generate "task.max_new_tokens=$new" "model.dtype=$dtype" \
        "data.batch_size=$BS" "data.path=$gen_data" "output.path=$W/out/$name.h5" \
        "runtime.trace=$W/out/$name.trace.json"
}
for n in $RANKS; do
    infer_jobs "$n" float32 fp32 exact true "$W/exact.jsonl" "$W/exact.jsonl" "$EXACT_NEW"
    name=train-$n-fp32; plan "$name" train "$n" float32 exact true
    # the workers' layers [k, L) are trained at every world size (one rank would otherwise train all of them)
    job "$name" "$n" 90 jobs/train.py model.dtype=float32 "data.path=$W/exact.jsonl" train.max_steps=3 \
        train.grad_accum=2 data.batch_size=2 "train.layers=[$K,$LAYERS]" "train.out_dir=$W/out/$name" \
        train.overwrite=true
done
step ref-bfloat16 150 "${REF[@]}" reference "$W" --device "$DEVICE" --dtype bfloat16 --batch-size "$BS" \
    --what score-speed:bench,gen-speed:bench,gen-speed-cb:bench
# throughput: the smallest and the largest world size first, in case the budget runs out
set -- $RANKS
BF16_RANKS="$1"; [ "$#" -gt 1 ] && BF16_RANKS="$1 ${!#}"
for n in $RANKS; do case " $BF16_RANKS " in *" $n "*) ;; *) BF16_RANKS="$BF16_RANKS $n" ;; esac; done
for n in $BF16_RANKS; do
    infer_jobs "$n" bfloat16 bf16 bench false "$W/bench.jsonl" "$W/gen.jsonl" "$GEN_NEW"
done

timeout 40 "${REF[@]}" report "$W" --device "$DEVICE"
rc=$?
say "total $((SECONDS - T0)) s"
exit $rc
