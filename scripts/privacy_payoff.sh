#!/usr/bin/env bash
# The privacy payoff: at a fixed noise level at the split, what each way of using the workers' answer buys,
# next to what the owner gets alone.
#
#   bash scripts/privacy_payoff.sh [OUT_DIR] [STEPS]
#
# Per point (k epsilon unit clip; PAYOFF_POINTS overrides, e.g. "0 10 token 3.099794387817383"), on one
# process with 2 threads (split training equals it exactly: tests/test_train.py):
#   frozen          the model as it is, noise at the split
#   lora            noise-aware LoRA on every layer after k (train.layers=[k, L))
#   denoiser        rank 0's denoiser over the frozen workers' answer (train.layers=[], train.denoiser.blocks)
#   lora+denoiser   both, trained jointly
#   owner-alone     the same denoiser with the workers' answer left out (train.denoiser.alone=true): what
#                   rank 0 computes without sending anything; plus the public-text unigram
# Training: STEPS steps on the built-in public text (noise seeded with privacy.seed=0). Evaluation: perplexity of
# jobs/infer.py task=score on the sample rows (text the training never saw), noise seeded with privacy.seed=1.
# Token recovery and the tight bound come from the audit's CSV (AUDIT_CSV, default docs/audit/audit.csv: the
# attackers see Z, which none of these variants changes). TRAIN_DATA and EVAL_DATA (JSONL with a "text" field)
# replace the built-in public text and the sample rows; the audit of AUDIT_CSV must then have used the same
# rows (audit.public_path=$TRAIN_DATA audit.eval_path=$EVAL_DATA).
# The owner-alone baseline of a k is the better of the unigram and the owner-alone denoiser; vs_owner_alone is
# that perplexity over each model's (> 1: the split beats the owner alone). Every k*_eps* folder of OUT_DIR is
# tabulated, so runs with other PAYOFF_POINTS or PAYOFF_VARIANTS add to one table; PAYOFF_POINTS= (empty)
# only tabulates.
# Writes OUT_DIR/payoff.csv, OUT_DIR/payoff.json and OUT_DIR/payoff.png, and prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-payoff_results}
STEPS=${2:-100}
PY=.venv/bin/python
AUDIT_CSV=${AUDIT_CSV:-docs/audit/audit.csv}
BLOCKS=${DENOISER_BLOCKS:-2}
DLR=${DENOISER_LR:-2e-3}
VARIANTS=${PAYOFF_VARIANTS:-"frozen lora denoiser lora+denoiser owner-alone"}
export NESA_HPC_KEYS="${NESA_HPC_KEYS:-$OUT/keys}"
mkdir -p "$OUT"
POINTS=()
IFS=';' read -r -a POINTS <<<"${PAYOFF_POINTS-0 10 token 3.099794387817383;2 1000 sequence 588.7997863769531}"
COMMON=(data.max_length=64 data.batch_size=8 runtime.threads=2)
TRAIN_ON=()
EVAL_ON=()
[[ -n ${TRAIN_DATA:-} ]] && TRAIN_ON=(data.path="$TRAIN_DATA")
[[ -n ${EVAL_DATA:-} ]] && EVAL_ON=(data.path="$EVAL_DATA")
TRAIN=(train.grad_accum=2 train.max_steps="$STEPS" train.lr=1e-3 train.warmup_steps=10 train.lora.r=16
       train.lora.alpha=32 train.save_every=1000000 train.overwrite=true train.denoiser.lr="$DLR")

score() {  # score NAME K EXTRA...: perplexity of the sample rows -> $OUT/.../NAME.h5
  local name=$1 k=$2
  shift 2
  $PY jobs/infer.py task=score split.k="$k" output.path="$name.h5" output.overwrite=true "${COMMON[@]}" \
    "${EVAL_ON[@]}" "$@"
}

for point in ${POINTS[@]+"${POINTS[@]}"}; do
  read -r K EPS UNIT CLIP <<<"$point"
  RUN="$OUT/k${K}_eps${EPS}"
  mkdir -p "$RUN"
  NOISE=(privacy=gaussian privacy.epsilon="$EPS" privacy.unit="$UNIT" privacy.clip="$CLIP")
  score "$RUN/clean" "$K"
  for v in $VARIANTS; do
    case $v in
      frozen) score "$RUN/frozen" "$K" "${NOISE[@]}" privacy.seed=1; continue ;;
      lora) layers="[$K,30]"; den=() ;;
      denoiser) layers="[]"; den=(train.denoiser.blocks="$BLOCKS") ;;
      lora+denoiser) layers="[$K,30]"; den=(train.denoiser.blocks="$BLOCKS") ;;
      owner-alone) layers="[]"; den=(train.denoiser.blocks="$BLOCKS" train.denoiser.alone=true) ;;
      *) echo "unknown variant $v" >&2; exit 2 ;;
    esac
    noise=("${NOISE[@]}" privacy.seed=0)
    [[ $v == owner-alone ]] && noise=(privacy=none)
    dir="$RUN/${v/+/_}"
    $PY jobs/train.py split.k="$K" "train.layers=$layers" "${noise[@]}" "${COMMON[@]}" "${TRAIN_ON[@]}" "${TRAIN[@]}" \
      "${den[@]}" \
      train.out_dir="$dir/train" train.owner_dir="$dir/owner"
    extra=()
    [[ $v == lora* ]] && extra+=(model.adapters="$dir/train/adapter")
    [[ $v != lora ]] && extra+=(split.denoiser="$dir/owner/denoiser")
    if [[ $v == owner-alone ]]; then
      score "$dir/eval" "$K" "${extra[@]}"
    else
      score "$dir/eval" "$K" "${NOISE[@]}" privacy.seed=1 "${extra[@]}"
    fi
  done
done
$PY - "$OUT" "$AUDIT_CSV" "${TRAIN_DATA:-}" "${EVAL_DATA:-}" <<'PYEOF'
import csv, json, math, sys
from pathlib import Path

import h5py
import numpy as np

from nesa_hpc.io.read import read_rows, sample_path
from nesa_hpc.io.public_text import public_texts
from nesa_hpc.models.weights import packaged_model_path
from transformers import AutoTokenizer

out, audit_csv = Path(sys.argv[1]), sys.argv[2]
train_data, eval_data = sys.argv[3] or None, sys.argv[4] or str(sample_path())


def perplexity(path):
    with h5py.File(path) as f:
        return math.exp(float(np.sum(f["nll_sum"][:])) / float(np.sum(f["n_tokens"][:])))


# the public-text unigram (add-one smoothed) over the same predicted tokens (max_length 64)
tok = AutoTokenizer.from_pretrained(packaged_model_path("smollm2-135m-instruct"))
counts = np.ones(len(tok), dtype=np.float64)
for text in (public_texts() if train_data is None else [t for _, t in read_rows(train_data, "auto", "text", "fail")]):
    for t in tok(text)["input_ids"]:
        counts[t] += 1
logp = np.log(counts / counts.sum())
held = [ids[1:] for ids in (tok(t, truncation=True, max_length=64)["input_ids"]
                            for _, t in read_rows(eval_data, "auto", "text", "fail"))]
unigram = math.exp(-float(np.mean(np.concatenate([logp[h] for h in held]))))
audit = list(csv.DictReader(open(audit_csv)))
rows = []
for run in sorted(out.glob("k*_eps*")):
    k, eps = int(run.name[1:].split("_")[0]), float(run.name.split("eps")[1])
    point = next(r for r in audit if int(r["k"]) == k and r["mechanism"] != "none" and float(r["epsilon"]) == eps)
    clean = perplexity(run / "clean.h5")
    found = {"frozen": run / "frozen.h5"} if (run / "frozen.h5").exists() else {}
    found.update({d.name.replace("_", "+"): d / "eval.h5" for d in sorted(run.iterdir()) if (d / "eval.h5").exists()})
    for model, path in found.items():
        summary = json.loads((path.parent / "owner" / "summary.json").read_text()) if model != "frozen" else {}
        ppl = perplexity(path)
        alone = model == "owner-alone"
        rows.append({"k": k, "unit": point["unit"], "epsilon": eps, "sigma": float(point["sigma"]), "model": model,
                     "perplexity": ppl, "perplexity_vs_clean": ppl / clean, "clean_perplexity": clean,
                     "unigram_perplexity": unigram,
                     "best_recovery": 0.0 if alone else float(point["best_recovery"]),
                     "bound_gdp": 0.0 if alone else float(point["bound_gdp"]), "floor": float(point["floor"]),
                     "train_steps": summary.get("steps", 0), "train_final_loss": summary.get("final_loss"),
                     "train_seconds": summary.get("seconds")})
# the owner-alone baseline of each k: the better of the public unigram and the owner-alone denoiser
alone = {r["k"]: r["perplexity"] for r in rows if r["model"] == "owner-alone"}
for r in rows:
    r["owner_alone_denoiser_perplexity"] = alone.get(r["k"])
    r["owner_alone_perplexity"] = min(alone.get(r["k"], math.inf), unigram)
    r["vs_owner_alone"] = r["owner_alone_perplexity"] / r["perplexity"]  # > 1: better than the owner alone
if not rows:
    sys.exit("no results")
with open(out / "payoff.csv", "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
(out / "payoff.json").write_text(json.dumps(rows, indent=1))
print(f"unigram (public text) perplexity {unigram:.1f}")
print(f"{'k':>2} {'unit':8} {'eps':>6} {'model':14} {'ppl':>10} {'x clean':>8} {'vs alone':>9} {'best rec':>8} "
      f"{'bound':>6}")
for r in rows:
    print(f"{r['k']:>2} {r['unit']:8} {r['epsilon']:>6g} {r['model']:14} {r['perplexity']:>10.1f} "
          f"{r['perplexity_vs_clean']:>8.1f} {r['vs_owner_alone']:>9.2f} {r['best_recovery']:>8.3f} "
          f"{r['bound_gdp']:>6.3f}")
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ks = sorted({r["k"] for r in rows})
fig, axes = plt.subplots(1, len(ks), figsize=(5.5 * len(ks), 4.2), squeeze=False)
for a, k in zip(axes[0], ks):
    pts = [r for r in rows if r["k"] == k and r["model"] != "owner-alone"]
    for r in pts:
        a.scatter(r["best_recovery"], r["perplexity_vs_clean"], s=30)
        a.annotate(r["model"], (r["best_recovery"], r["perplexity_vs_clean"]), fontsize=7, xytext=(4, 3),
                   textcoords="offset points")
    base = next(r for r in rows if r["k"] == k)
    if base["owner_alone_denoiser_perplexity"] is not None:
        a.axhline(base["owner_alone_denoiser_perplexity"] / base["clean_perplexity"], color="k", ls="--",
                  label="owner-alone denoiser (no workers)")
    a.axhline(unigram / base["clean_perplexity"], color="grey", ls=":", label="public unigram")
    a.axhline(base["owner_alone_perplexity"] / 2 / base["clean_perplexity"], color="red", ls="-.", lw=0.8,
              label="2x better than the owner alone")
    a.axhline(1.0, color="green", ls="-", lw=0.8, label="clean model")
    a.set_yscale("log")
    a.set_xlabel("token recovery, at least (best attacker)")
    a.set_ylabel("perplexity / clean perplexity")
    a.set_title(f"k={k}, {base['unit']} epsilon={base['epsilon']:g}")
    a.legend(fontsize=7)
fig.tight_layout()
fig.savefig(out / "payoff.png", dpi=110)
PYEOF
