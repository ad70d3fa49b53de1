"""Run many split-inference cases inside one MPI launch and compare each with plain transformers.

    mpiexec -n N python tests/mpi_check.py spec.json report.json

``spec.json`` is a list of cases (model folder, task, k, head, padding, ...). Every rank runs every
case through ``nesa_hpc.infer.job.run``; rank 0 then computes the single-process transformers reference
and writes one report entry per case. Workers record every message they receive, so the report also
says whether a worker ever saw anything but hidden states, the mask and the positions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from mpi4py import MPI

from nesa_hpc.engine.job import settle
from nesa_hpc.infer.job import run
from nesa_hpc.infer.tasks import score_positions
from nesa_hpc.io.batch import make_batches
from nesa_hpc.io.read import read_rows
from nesa_hpc.io.results import read_results

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def overrides(case: dict, out: str) -> list[str]:
    ov = [f"model.path={case['model']}", f"task={case['task']}", f"split.k={case['k']}",
          f"split.head={case['head']}", f"data.path={case['data']}", f"data.padding_side={case['padding']}",
          f"data.batch_size={case.get('batch_size', 4)}", f"data.max_length={case.get('max_length', 64)}",
          f"output.path={out}", "output.overwrite=true", "runtime.threads=1"]
    if case["task"] == "embed":
        ov.append(f"task.pooling={case.get('pooling', 'mean')}")
        ov.append("task.normalize=false")  # the reference pools without normalising
    ov += [f"{key}={value}" for key, value in case.get("extra", {}).items()]
    return ov


def reference(case: dict, cfg, tokenizer, model, rows) -> dict:
    """Per-row outputs of the unsplit transformers model: same padded batches, and one row at a time."""
    d = cfg.data
    batches = list(make_batches(iter(rows), tokenizer, d.batch_size, d.max_length, d.padding_side,
                                bucket_window=d.bucket_window))
    padded, single = {}, {}
    with torch.no_grad():
        for b in batches:
            if case["task"] == "score":
                logits = model(b.ids, attention_mask=b.mask, position_ids=b.pos).logits
                sel = score_positions(b.mask)
                # flattened (B*(T-1), V) like transformers' own causal-LM loss; a strided (B, V, T) layout
                # reduces over the vocabulary in another order and moves SmolLM2's NLL by ~2e-4
                B, T, V = logits.shape
                nll = F.cross_entropy(logits[:, :-1].reshape(-1, V), b.ids[:, 1:].reshape(-1),
                                      reduction="none").view(B, T - 1)
                for i, r in enumerate(b.rows.tolist()):
                    padded[r] = float((nll[i] * sel[i]).sum() / sel[i].sum())
            else:
                # RoBERTa-style encoders number positions from the padding index on, from the token ids
                own = getattr(getattr(model, "embeddings", None), "padding_idx", None) is not None
                hs = model(b.ids, attention_mask=b.mask, **({} if own else {"position_ids": b.pos})).last_hidden_state
                m = b.mask.unsqueeze(-1).float()
                if case.get("pooling", "mean") == "mean":
                    pooled = (hs * m).sum(1) / m.sum(1)
                else:
                    last = b.mask.shape[1] - 1 - b.mask.flip(-1).argmax(-1)
                    pooled = hs[torch.arange(len(hs)), last]
                for i, r in enumerate(b.rows.tolist()):
                    padded[r] = pooled[i]
        for r, text in rows:
            ids = torch.tensor([tokenizer(text, truncation=True, max_length=case.get("max_length", 64))["input_ids"]])
            if case["task"] == "score":
                logits = model(ids).logits
                single[r] = float(F.cross_entropy(logits[0, :-1], ids[0, 1:]))
            else:
                hs = model(ids).last_hidden_state[0]
                single[r] = hs.mean(0) if case.get("pooling", "mean") == "mean" else hs[-1]
    return {"batches": batches, "padded": padded, "single": single}


def check_traffic(records: list, batches: list) -> str | None:
    """Every message a worker received must be (float states, the batch's mask, the batch's positions)."""
    by_index = {b.index: b for b in batches}
    for rec in records:
        if rec["kind"] != 1:  # only DATA carries tensors to workers
            if rec["dtypes"]:
                return f"non-data message with tensors {rec['dtypes']}"
            continue
        b = by_index[rec["batch_id"]]
        if rec["dtypes"][0] not in ("torch.float32", "torch.float16", "torch.bfloat16"):
            return f"first tensor is {rec['dtypes'][0]}, not floating point"
        if rec["shapes"][0][:2] != list(b.ids.shape):
            return f"hidden states of shape {rec['shapes'][0]} for a batch of {list(b.ids.shape)}"
        if rec["dtypes"][1:] != ["torch.int8", "torch.int32", "torch.int32"]:
            return f"unexpected tensors {rec['dtypes']}"
        if rec["shapes"][3] != [b.size] or set(rec["ints"][2]) != {-1}:
            return f"the non-finite marks are not one clean (-1) value per row: {rec['ints'][2]}"
        if rec["ints"][0] != b.mask.tolist() or rec["ints"][1] != b.pos.tolist():
            return "an integer tensor is neither the mask nor the positions"
        if any(ints == b.ids.tolist() for ints in rec["ints"]):
            return "token ids crossed the wire"
    return None


def privacy_report(case: dict, cfg, out: str, traffic: list) -> dict:
    """With noise on: the per-row results, and how far the states rank 1 received are from one application
    of the privacy transform to rank 0's layer-k states, computed here from the whole model."""
    from transformers import AutoTokenizer

    from nesa_hpc.config import settings_from_cfg
    from nesa_hpc.models.weights import build_adapter, load_modules
    from nesa_hpc.privacy.mechanism import make_privacy

    res, attrs = read_results(out)
    report = {"rows": res["row"].tolist(), "complete": bool(attrs["complete"]), "values": res["nll_mean"].tolist(),
              "epsilon_spent": res["epsilon_spent"].tolist(),
              "attrs": {k: (v.item() if hasattr(v, "item") else v) for k, v in attrs.items()
                        if k.startswith("privacy_")}}
    received = [r for r in (traffic[1] if len(traffic) > 1 else []) if r["states"] is not None]
    if not received:
        return report
    settings = settings_from_cfg(cfg)
    adapter = build_adapter(case["model"])
    load_modules(adapter, case["model"], [*adapter.embed_modules, *adapter.stage_modules] +
                 [adapter.layer_module(i) for i in range(case["k"])], "float32")
    clip = attrs["privacy_clip"] if settings.privacy.clip == "auto" else None
    privacy = make_privacy(settings.privacy, case["k"], clip)
    tokenizer = AutoTokenizer.from_pretrained(case["model"])
    d = cfg.data
    batches = {b.index: b for b in make_batches(iter(read_rows(case["data"])), tokenizer, d.batch_size,
                                                d.max_length, d.padding_side, bucket_window=d.bucket_window)}
    diff, seen, pad = 0.0, 0.0, 0.0
    with torch.inference_mode():
        for rec in received:
            b = batches[rec["batch_id"]]
            h = adapter.run_layers(range(case["k"]), adapter.embed(b.ids, b.pos), b.mask, b.pos)
            expected = privacy.apply(h, b.mask, b.rows, digests=b.digests())
            diff = max(diff, float((rec["states"] - expected).abs().max()))
            pad = max(pad, float(rec["states"][~b.mask.bool()].abs().max()) if (b.mask == 0).any() else 0.0)
            seen = max(seen, float(expected.abs().max()))
    report.update(max_diff_states=diff, max_abs_states=seen, max_abs_padding=pad, messages_checked=len(received))
    return report


def main(argv: list[str] | None = None, comm=None) -> None:
    """Run the spec ``argv[0]`` on every rank of ``comm`` (default ``MPI.COMM_WORLD``); report to ``argv[1]``."""
    argv = argv or sys.argv[1:]
    spec_path, report_path = argv[0], argv[1]
    cases = json.loads(Path(spec_path).read_text())
    comm = comm or MPI.COMM_WORLD
    rank = comm.Get_rank()
    report = []
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    models: dict = {}
    references: dict = {}
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for n, case in enumerate(cases):
            out = str(Path(report_path).with_name(f"case{n}.h5"))
            cfg = compose(config_name="infer", overrides=overrides(case, out))
            records: list = []
            keep_states = bool(case.get("privacy_check", False))

            def spy(source, msg, records=records, keep=keep_states):
                records.append({"source": source, "kind": int(msg.kind), "batch_id": msg.batch_id,
                                "dtypes": [str(t.dtype) for t in msg.tensors],
                                "shapes": [list(t.shape) for t in msg.tensors],
                                "ints": [t.tolist() for t in msg.tensors if not t.is_floating_point()],
                                "states": msg.tensors[0].clone() if keep and source == 0 and msg.tensors else None})

            error = None
            try:
                run(cfg, comm, on_recv=spy if rank > 0 else None)
            except Exception as exc:  # reported, and the other cases still run
                error = f"{type(exc).__name__}: {exc}"
            errors = comm.gather(error, root=0)
            traffic = comm.gather(records, root=0)
            if rank != 0:
                settle(comm)  # sleep while rank 0 computes the reference
                continue
            entry = {"case": case, "error": next((e for e in errors if e), None)}
            if entry["error"] is None and case.get("privacy_check"):
                entry.update(privacy_report(case, cfg, out, traffic))
            elif entry["error"] is None:
                # the unsplit model's outputs depend on the model, the task and the batching, not on the split:
                # computed once per launch for the cases that share them
                d = cfg.data
                key = json.dumps([case["model"], case["task"], case.get("pooling", "mean"), case["data"],
                                  d.batch_size, d.max_length, d.padding_side, d.bucket_window, case.get("extra")])
                if key not in references:
                    factory = AutoModelForCausalLM if case["task"] == "score" else AutoModel
                    if (case["model"], factory) not in models:
                        models[case["model"], factory] = (
                            AutoTokenizer.from_pretrained(case["model"]),
                            factory.from_pretrained(case["model"], dtype=torch.float32).eval())
                    tokenizer, model = models[case["model"], factory]
                    references[key] = reference(case, cfg, tokenizer, model, list(read_rows(case["data"])))
                ref = references[key]
                res, attrs = read_results(out)
                entry["rows"] = res["row"].tolist()
                entry["complete"] = bool(attrs["complete"])
                key = "nll_mean" if case["task"] == "score" else "embedding"
                got = {int(r): torch.as_tensor(v) for r, v in zip(res["row"], res[key], strict=True)}
                entry["max_diff_padded"] = max(float((got[r] - torch.as_tensor(v)).abs().max())
                                               for r, v in ref["padded"].items())
                entry["max_diff_single"] = max(float((got[r] - torch.as_tensor(v)).abs().max())
                                               for r, v in ref["single"].items())
                entry["traffic_error"] = next((e for e in (check_traffic(recs, ref["batches"])
                                                           for recs in traffic[1:]) if e), None)
                entry["worker_messages"] = sum(len(recs) for recs in traffic[1:])
            report.append(entry)
            settle(comm)
    if rank == 0:
        Path(report_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
