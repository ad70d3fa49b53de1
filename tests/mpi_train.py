"""Run split-training cases inside one MPI launch and compare each with training the unsplit model.

    mpiexec -n N python tests/mpi_train.py spec.json report.json

Every rank runs every case through ``nesa_hpc.train.job.run_train`` and records the gradients of its trainable
parameters after the first backward pass. Rank 0 then trains the unsplit transformers model in this one
process (its own forward, loss, ``clip_grad_norm_`` and one AdamW over every trainable parameter) on the
same micro-batches, and reports the largest gradient and loss differences, plus what the workers received.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import strict_json
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from mpi4py import MPI

from nesa_hpc.config import settings_from_cfg
from nesa_hpc.engine.job import settle
from nesa_hpc.engine.topology import make_topology
from nesa_hpc.models.adapter import make_adapter
from nesa_hpc.train.job import epoch_batches, load_examples, lr_factor, make_trainable, run_train, train_spec

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def overrides(case: dict, out: str) -> list[str]:
    ov = [f"model.path={case['model']}", f"split.k={case['k']}", f"split.head={case['head']}",
          f"data.path={case['data']}", f"data.batch_size={case.get('batch_size', 3)}", "data.max_length=24",
          f"train.out_dir={out}", "train.overwrite=true", "runtime.threads=1", f"train.mode={case['mode']}",
          f"train.max_steps={case.get('steps', 3)}", f"train.grad_accum={case.get('grad_accum', 2)}",
          f"train.owner_trainable={str(case.get('owner_trainable', False)).lower()}",
          f"train.lr={case.get('extra', {}).get('train.lr', 0.01)}",
          "train.warmup_steps=1", "train.max_grad_norm=0.5", "train.save_every=1000"]
    ov += [f"{key}={value}" for key, value in case.get("extra", {}).items() if key != "train.lr"]
    return ov


def reference(cfg, case: dict, world: int) -> tuple[dict, list[float]]:
    """Gradients after the first backward pass and the loss of each step, trained in one process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings, spec = settings_from_cfg(cfg), train_spec(cfg)
    tok = AutoTokenizer.from_pretrained(case["model"])
    model = AutoModelForCausalLM.from_pretrained(case["model"], dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = make_adapter(model)
    topo = make_topology(adapter.num_layers, settings.k, world, settings.head, settings.partition, 0.0,
                         settings.owner_tail)
    owner = set(topo.layers_of(0)) | set(topo.tail) if world > 1 and not spec.owner_trainable else set()
    lo, hi = spec.layers or (0, adapter.num_layers)
    layers = [i for i in range(adapter.num_layers) if lo <= i < hi and i not in owner]
    params = make_trainable(adapter, layers, spec)
    opt = torch.optim.AdamW([p for _, p in params], lr=spec.lr, weight_decay=spec.weight_decay)
    total = spec.max_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, spec.warmup_steps, spec.schedule))
    examples = load_examples(settings, spec, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    batches_per_epoch = math.ceil(len(examples) / settings.batch_size)
    per_epoch = math.ceil(batches_per_epoch / spec.grad_accum)
    grads, losses = {}, []
    for step in range(total):
        epoch, within = divmod(step, per_epoch)
        batches = epoch_batches(examples, epoch, spec.seed, settings.batch_size, pad, settings.padding_side)
        batches = batches[within * spec.grad_accum:(within + 1) * spec.grad_accum]
        n_target = sum(float(b.weights().sum()) for b in batches)
        loss = 0.0
        for b in batches:
            logits = model(b.ids, attention_mask=b.mask, position_ids=b.pos).logits
            sel = b.scored
            ce = F.cross_entropy(logits[:, :-1][sel], b.ids[:, 1:][sel], reduction="none")
            part = (ce * b.weights()).sum()
            (part / n_target).backward()
            loss += float(part.detach())
        losses.append(loss / n_target)
        if step in (0, total - 1):
            grads.update({(step, n): p.grad.clone() for n, p in params})
        torch.nn.utils.clip_grad_norm_([p for _, p in params], spec.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return grads, losses


def main(argv: list[str] | None = None, comm=None) -> None:
    """Run the spec ``argv[0]`` on every rank of ``comm`` (default ``MPI.COMM_WORLD``); report to ``argv[1]``."""
    argv = argv or sys.argv[1:]
    spec_path, report_path = argv[0], argv[1]
    cases = json.loads(Path(spec_path).read_text())
    comm = comm or MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    report = []
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for n, case in enumerate(cases):
            out = str(Path(report_path).with_name(f"train{n}"))
            cfg = compose(config_name="train", overrides=overrides(case, out))
            grads, received = {}, []
            last = case.get("steps", 3) - 1

            def on_step(stage, step, loss, grads=grads, last=last):
                if step in (0, last):
                    grads.update({(step, name): p.grad.clone() for name, p in stage.params if p.grad is not None})

            def spy(source, msg, received=received):
                received.append({"source": source, "kind": int(msg.kind),
                                 "dtypes": sorted({str(t.dtype) for t in msg.tensors})})

            run_train(cfg, comm, on_step=on_step, on_recv=spy if rank > 0 else None)
            all_grads = comm.gather(grads, root=0)
            traffic = comm.gather(received, root=0)
            if rank != 0:
                settle(comm)  # sleep while rank 0 trains the reference
                continue
            split_grads = {k: v for part in all_grads for k, v in part.items()}
            metrics = strict_json.lines((Path(out) / "metrics.jsonl").read_text())
            entry = {"case": case, "split_losses": [m["loss"] for m in metrics]}
            if case.get("reference", True):
                ref_grads, ref_losses = reference(cfg, case, world)
                entry["ref_losses"] = ref_losses
                entry["grad_names_equal"] = sorted(split_grads) == sorted(ref_grads) and bool(ref_grads)
                entry["n_grads"] = len(ref_grads)
                for when, step in (("first", 0), ("last", case.get("steps", 3) - 1)):
                    pairs = [(split_grads[k], v) for k, v in ref_grads.items() if k in split_grads and k[0] == step]
                    # first step: each tensor against its own largest entry. Last step: against the step's
                    # largest entry of any tensor. After an AdamW step LoRA's A matrices get gradients scaled by
                    # the small new B, and those of q/k projections over rows of one or two tokens (a softmax over
                    # one position has no gradient) are rounding alone, which no fp32 order of sums reproduces.
                    largest = max((float(v.abs().max()) for _, v in pairs), default=0.0)
                    diffs = [float((s - v).abs().max())
                             / max(largest if when == "last" else float(v.abs().max()), 1e-12) for s, v in pairs]
                    entry[f"max_grad_rel_diff_{when}"] = max(diffs) if diffs else math.inf
                entry["nonzero_grads"] = sum(bool(v.abs().max() > 0) for v in ref_grads.values())
            # what workers received: kinds and dtypes only (never token ids: no int64 tensors)
            entry["worker_dtypes"] = sorted({d for recs in traffic[1:] for r in recs for d in r["dtypes"]})
            entry["worker_messages"] = sum(len(recs) for recs in traffic[1:])
            entry["summary"] = strict_json.loads((Path(out) / "summary.json").read_text())
            report.append(entry)
            settle(comm)
    if rank == 0:
        Path(report_path).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
