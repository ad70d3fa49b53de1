#!/usr/bin/env bash
# The privacy payoff of noise-aware fine-tuning: for a fixed noise level at the split, the audit's perplexity
# and token recovery for the frozen model and for the model fine-tuned with that noise in its forward pass.
#
#   bash scripts/privacy_payoff.sh [OUT_DIR] [STEPS]
#
# Per split point (k=0 token unit at epsilon 10; k=2 sequence unit at epsilon 3000), with the clip norm the
# audit calibrates at that k (percentile 90 of public unit norms, audit defaults):
#   1. jobs/train.py: LoRA on every layer after k, privacy=gaussian at that epsilon and clip, on the
#      built-in public text (one process: split training equals it exactly, see tests/test_train.py);
#   2. jobs/audit.py on the held-out sample rows at the same epsilon, for the frozen model and with
#      model.adapters=<the trained adapter>.
# Writes OUT_DIR/payoff.csv and OUT_DIR/payoff.json, and prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-payoff_results}
STEPS=${2:-100}
PY=.venv/bin/python
MPIEXEC=.venv/bin/mpiexec
mkdir -p "$OUT"
# k epsilon unit clip (the audit's calibrated clip at that k: docs/audit/audit.csv); PAYOFF_POINTS overrides,
# e.g. PAYOFF_POINTS="0 30 token 3.099794387817383;2 1000 sequence 588.7997863769531"
IFS=';' read -r -a POINTS <<<"${PAYOFF_POINTS:-0 10 token 3.099794387817383;2 3000 sequence 588.7997863769531}"
for point in "${POINTS[@]}"; do
  read -r K EPS UNIT CLIP <<<"$point"
  RUN="$OUT/k${K}_eps${EPS}"
  $MPIEXEC -n 1 $PY jobs/train.py split.k="$K" "train.layers=[$K,30]" privacy=gaussian privacy.epsilon="$EPS" \
    privacy.unit="$UNIT" privacy.clip="$CLIP" privacy.seed=0 data.max_length=64 data.batch_size=8 \
    train.grad_accum=2 train.max_steps="$STEPS" train.lr=1e-3 train.warmup_steps=10 train.lora.r=16 \
    train.lora.alpha=32 train.out_dir="$RUN/train" train.owner_dir="$RUN/owner" train.overwrite=true train.save_every=50 runtime.threads=2
  for model in frozen tuned; do
    extra=()
    [[ $model == tuned ]] && extra=(model.adapters="$RUN/train/adapter")
    $MPIEXEC -n 1 $PY jobs/audit.py "audit.ks=[$K]" "audit.epsilons=[$EPS]" audit.out_dir="$RUN/audit_$model" \
      runtime.threads=2 "${extra[@]}"
  done
done
$PY - "$OUT" <<'PYEOF'
import csv, json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = []
for run in sorted(out.glob("k*_eps*")):
    table = {m: [r for r in csv.DictReader(open(run / f"audit_{m}" / "audit.csv"))] for m in ("frozen", "tuned")}
    clean = next(r for r in table["frozen"] if r["mechanism"] == "none")
    summary = json.loads((run / "owner" / "summary.json").read_text())
    for m in ("frozen", "tuned"):
        noisy = next(r for r in table[m] if r["mechanism"] != "none")
        best = max(float(noisy[c]) for c in ("nn_recovery", "head_recovery", "probe_recovery")
                   if noisy[c] not in ("nan", ""))
        rows.append({"k": int(noisy["k"]), "unit": noisy["unit"], "epsilon": float(noisy["epsilon"]),
                     "sigma": float(noisy["sigma"]), "model": m, "perplexity": float(noisy["perplexity"]),
                     "perplexity_vs_clean": float(noisy["perplexity"]) / float(clean["perplexity"]),
                     "best_recovery": best, "nn": noisy["nn_recovery"], "head": noisy["head_recovery"],
                     "probe": noisy["probe_recovery"], "floor": float(noisy["floor"]),
                     "train_steps": summary["steps"] if m == "tuned" else 0,
                     "train_final_loss": summary["final_loss"] if m == "tuned" else None})
with open(out / "payoff.csv", "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
(out / "payoff.json").write_text(json.dumps(rows, indent=1))
print(f"{'k':>2} {'unit':8} {'eps':>6} {'model':6} {'ppl':>10} {'x clean':>8} {'best rec':>8} {'floor':>6}")
for r in rows:
    print(f"{r['k']:>2} {r['unit']:8} {r['epsilon']:>6g} {r['model']:6} {r['perplexity']:>10.1f} "
          f"{r['perplexity_vs_clean']:>8.1f} {r['best_recovery']:>8.3f} {r['floor']:>6.3f}")
PYEOF
