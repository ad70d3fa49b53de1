"""Run many ``task=generate`` cases inside one MPI launch and compare each with transformers ``generate``.

    mpiexec -n N python tests/mpi_generate.py spec.json report.json

``spec.json`` is a list of cases (model folder, k, head, decoding options, ...). Every rank runs every
case through ``nesa_hpc.infer.job.run``. Rank 0 then computes the reference and writes one report entry per
case: for greedy cases, ``model.generate(do_sample=False)`` on each prompt alone (no padding); for
sampling cases, the same job run again on rank 0 alone (world size 1), which the pipeline must equal.
Workers record every message they receive, so the report also says whether any integer that crossed
the wire could be a token id.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from mpi4py import MPI

from nesa_hpc.engine.job import settle
from nesa_hpc.engine.messages import Kind
from nesa_hpc.infer.job import run
from nesa_hpc.io.read import read_rows
from nesa_hpc.io.results import read_results

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def overrides(case: dict, out: str) -> list[str]:
    ov = [f"model.path={case['model']}", "task=generate", f"split.k={case['k']}", f"split.head={case['head']}",
          f"data.path={case['data']}", f"data.batch_size={case.get('batch_size', 4)}",
          f"data.max_length={case.get('max_length', 64)}", f"task.max_new_tokens={case.get('max_new_tokens', 12)}",
          f"output.path={out}", "output.overwrite=true", "runtime.threads=1"]
    ov += [f"{key}={value}" for key, value in case.get("extra", {}).items()]
    return ov


def greedy_reference(case: dict, tokenizer, model, rows, eos: list[int]) -> dict[int, list[int]]:
    """Each prompt alone (no padding) through ``model.generate(do_sample=False)``."""
    ref = {}
    with torch.no_grad():
        for r, text in rows:
            if case.get("extra", {}).get("data.chat_template"):
                text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                     add_generation_prompt=True)
            ids = torch.tensor([tokenizer(text, truncation=True, max_length=case.get("max_length", 64))["input_ids"]])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=case.get("max_new_tokens", 12), eos_token_id=eos,
                                 pad_token_id=eos[0] if eos else 0)
            ref[r] = out[0, ids.shape[1]:].tolist()
    return ref


def wire_error(records: list, case: dict) -> str | None:
    """Workers may only see float states and small integers (mask bits, positions, marks, row indices)."""
    bound = case.get("max_length", 64) + case.get("max_new_tokens", 12)
    for rec in records:
        if rec["kind"] == int(Kind.GENERATE):
            floats = ("torch.float32", "torch.float16", "torch.bfloat16")
            for name, dtype in rec["dtypes"].items():
                if name.endswith("_states"):
                    if dtype not in floats:
                        return f"{name} of dtype {dtype}, not floating point"
                    continue
                # mask bits and "prompt done" / "every position" flags in int8; row indices, positions and marks
                # in int32
                want = "torch.int8" if name.endswith("_mask") or name in ("join_done", "join_whole") else "torch.int32"
                if dtype != want:
                    return f"{name} of dtype {dtype}, not {want}"
        elif rec["kind"] == int(Kind.SPLIT):  # row indices in a lane and the lane that takes rows
            if rec["dtypes"] != {"moved": "torch.int32", "kept": "torch.int32", "to": "int"}:
                return f"a lane split with fields {rec['dtypes']}"
        elif rec["dtypes"]:
            return f"message of kind {rec['kind']} with tensors {rec['dtypes']}"
        for ints in rec["ints"]:
            flat = torch.tensor(ints).flatten()
            if flat.numel() and int(flat.max()) >= bound:
                return f"an integer {int(flat.max())} >= {bound} crossed the wire (a token id?)"
    return None


def _tokens(res: dict) -> dict[int, list[int]]:
    return {int(r): [int(t) for t in ids] for r, ids in zip(res["row"], res["generated_ids"], strict=True)}


def main(argv: list[str] | None = None, comm=None) -> None:
    """Run the spec ``argv[0]`` on every rank of ``comm`` (default ``MPI.COMM_WORLD``); report to ``argv[1]``."""
    argv = argv or sys.argv[1:]
    spec_path, report_path = argv[0], argv[1]
    cases = json.loads(Path(spec_path).read_text())
    comm = comm or MPI.COMM_WORLD
    rank = comm.Get_rank()
    report = []
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models: dict[str, tuple] = {}
    references: dict[str, dict] = {}
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for n, case in enumerate(cases):
            out = str(Path(report_path).with_name(f"gen{n}.h5"))
            cfg = compose(config_name="infer", overrides=overrides(case, out))
            records: list = []

            def spy(source, msg, records=records):
                named = {f.name: getattr(msg, f.name) for f in fields(msg)[1:]}  # the wire payload, by name
                records.append({"kind": int(msg.kind), "dtypes": {k: str(getattr(t, "dtype", type(t).__name__))
                                                                     for k, t in named.items()},
                                "ints": [t.tolist() for t in msg.tensors if not t.is_floating_point()]})

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
            if entry["error"] is None:
                res, attrs = read_results(out)
                got = _tokens(res)
                entry["rows"] = res["row"].tolist()
                entry["complete"] = bool(attrs["complete"])
                entry["n_generated"] = res["n_generated"].tolist()
                entry["n_releases"] = res["n_releases"].tolist()
                entry["finish_reason"] = [x.decode() for x in res["finish_reason"]]
                entry["generated_text"] = [x.decode() for x in res["generated_text"]]
                entry["n_prompt_tokens"] = res["n_prompt_tokens"].tolist()
                keys = ("decoding", "seed", "temperature", "max_new_tokens", "max_groups_in_flight", "generation_steps",
                        "lane_splits", "turns")
                entry["attrs"] = {k: attrs[k].item() if isinstance(attrs[k], np.generic) else attrs[k] for k in keys}
                entry["eos_token_ids"] = json.loads(attrs["eos_token_ids"])
                if float(case.get("extra", {}).get("task.temperature", 0)) == 0:
                    if case["model"] not in models:
                        models[case["model"]] = (
                            AutoTokenizer.from_pretrained(case["model"]),
                            AutoModelForCausalLM.from_pretrained(case["model"], dtype=torch.float32).eval())
                    tokenizer, model = models[case["model"]]
                    # each prompt alone through generate: the same for every split of the same decoding
                    key = json.dumps([case["model"], case["data"], case.get("max_length", 64),
                                      case.get("max_new_tokens", 12),
                                      case.get("extra", {}).get("data.chat_template"), entry["eos_token_ids"]])
                    if key not in references:
                        references[key] = greedy_reference(case, tokenizer, model, list(read_rows(case["data"])),
                                                           entry["eos_token_ids"])
                    ref = references[key]
                else:
                    # the same sampling job on rank 0 alone (world size 1)
                    single = str(Path(report_path).with_name(f"gen{n}_single.h5"))
                    run(compose(config_name="infer", overrides=overrides(case, single)), MPI.COMM_SELF)
                    ref = _tokens(read_results(single)[0])
                entry["mismatched_rows"] = sorted(r for r in ref if ref[r] != got.get(r))
                entry["ref_lengths"] = [len(ref[r]) for r in sorted(ref)]
                entry["tokens"] = {str(r): got[r] for r in sorted(got)}
                entry["wire_error"] = next((e for e in (wire_error(recs, case) for recs in traffic[1:]) if e), None)
                entry["worker_messages"] = sum(len(recs) for recs in traffic[1:])
            report.append(entry)
            settle(comm)
    if rank == 0:
        Path(report_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
