"""Helper of scripts/gpu_check.sh: test data and model, plain-transformers references, a transport self-check,
and the final table.

    python scripts/gpu_reference.py prepare DIR --model auto|tiny|smollm2|PATH --profile gpu|cpu
    python scripts/gpu_reference.py transport DIR --device cuda|cpu
    python scripts/gpu_reference.py reference DIR --device cuda|cpu --dtype float32|bfloat16 --what score-exact,...
    python scripts/gpu_reference.py report DIR

Every subcommand reads and writes files in DIR (the check's work folder); ``report`` reads what the steps
left there (``steps/<name>.rc``: exit status and seconds, ``logs/<name>.log``, the jobs' HDF5 files and
training summaries, ``ref-*.json``), prints one table and exits 1 when a check failed.
It imports nesa_hpc only for ``transport`` (the object under test) and to find the packaged model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "nesa_hpc" / "sample_data" / "sample.jsonl"

# sizes of the test data per profile: rows for the exactness runs, rows and words for the throughput runs
PROFILES = {
    "gpu": {"exact_rows": 24, "bench_rows": 512, "bench_join": 6, "gen_rows": 64, "gen_new": 32},
    "cpu": {"exact_rows": 12, "bench_rows": 24, "bench_join": 3, "gen_rows": 8, "gen_new": 6},
}
EXACT_NEW_TOKENS = 8
MAX_LENGTH = 128
TOL_SCORE_ABS, TOL_SCORE_REL = 1e-3, 1e-5   # fp32: |nll_sum| per row vs transformers
TOL_TRAIN_REL = 1e-4                         # fp32: step losses across world sizes
TOL_BF16_NLL_MEAN = 0.1                      # bf16 sanity bound on nll_mean per row (other batching = other rounding)
TIE_MARGIN = 1e-3                            # greedy: a first difference where transformers' top-2 logits are
                                             # this close counts as a tie


def _rows(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def _write_rows(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


# ---------------------------------------------------------------------------------------------- prepare
def _random_model(folder: Path, texts: list[str], shape: str) -> Path:
    """A random Llama with a byte-level BPE tokenizer trained on ``texts``: needs no packaged model.
    ``shape``: ``tiny`` (6 layers, hidden 64) or ``smollm2`` (SmolLM2-135M's layers, widths and vocabulary
    size, so throughput means something on a GPU)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    ids = {"pad_token_id": fast.pad_token_id, "bos_token_id": fast.bos_token_id, "eos_token_id": fast.eos_token_id}
    if shape == "tiny":
        config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             tie_word_embeddings=False, **ids)
    else:  # the tokenizer uses the first ids of the 49152 only
        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                             tie_word_embeddings=True, **ids)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


RANDOM_LABELS = {"tiny": "tiny random Llama (6 layers, hidden 64)",
                 "smollm2": "random Llama shaped like SmolLM2-135M (30 layers, hidden 576, vocab 49152)"}


def _resolve_model(choice: str, work: Path, texts: list[str], profile: str) -> tuple[Path, str]:
    """auto: the packaged SmolLM2 when it is installed (or already converted), else a random Llama: SmolLM2's
    shape on a GPU, tiny on CPU. tiny | random: those random models. smollm2: the packaged model or an error."""
    if choice not in ("auto", "tiny", "random", "smollm2"):
        path = Path(choice).expanduser()
        if not (path / "config.json").exists():
            raise SystemExit(f"GPU_CHECK_MODEL={choice}: no config.json in that folder")
        return path, f"folder {path}"
    if choice in ("auto", "smollm2"):
        try:
            sys.path.insert(0, str(ROOT))
            from nesa_hpc.models.weights import cache_dir, packaged_model_path

            converted = cache_dir() / "smollm2-135m-instruct"
            path = converted if (converted / "config.json").exists() else packaged_model_path("smollm2-135m-instruct")
            return path, "SmolLM2-135M-Instruct (packaged)"
        except Exception as exc:  # noqa: BLE001 - any failure means: not installed here
            if choice == "smollm2":
                raise SystemExit(f"GPU_CHECK_MODEL=smollm2, but the packaged model is not usable: {exc}") from None
            print(f"packaged SmolLM2 not usable here ({str(exc).splitlines()[0][:200]}); using a random Llama")
    shape = "tiny" if choice == "tiny" or (choice == "auto" and profile == "cpu") else "smollm2"
    return _random_model(work / f"random-{shape}", texts, shape), RANDOM_LABELS[shape]


def prepare(args) -> None:
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    prof = PROFILES[args.profile]
    texts = _rows(SAMPLE)
    model, label = _resolve_model(args.model, work, texts, args.profile)
    _write_rows(work / "exact.jsonl", texts[:prof["exact_rows"]])
    join = prof["bench_join"]
    _write_rows(work / "bench.jsonl", [" ".join(texts[(i + j) % len(texts)] for j in range(join))
                                       for i in range(prof["bench_rows"])])
    _write_rows(work / "gen.jsonl", [texts[i % len(texts)] for i in range(prof["gen_rows"])])
    from transformers import AutoConfig

    layers = AutoConfig.from_pretrained(model).num_hidden_layers
    info = {"model": str(model), "label": label, "num_layers": layers, "profile": args.profile,
            "exact_new_tokens": EXACT_NEW_TOKENS, "gen_new_tokens": prof["gen_new"], "max_length": MAX_LENGTH}
    (work / "prepared.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))


# -------------------------------------------------------------------------------------------- transport
def transport(args) -> None:
    """One process, MPI self-messages through MpiTransport: values must survive staging while the producer
    stream is still busy, and no whole-stream or whole-device synchronize may happen in send()."""
    import torch
    from mpi4py import MPI

    sys.path.insert(0, str(ROOT))
    from nesa_hpc.engine.transport import MpiTransport, mpi_cuda_aware

    comm = MPI.COMM_WORLD
    me = comm.Get_rank()
    dev = torch.device(args.device)
    modes = [False, True] if dev.type == "cuda" and mpi_cuda_aware() else [False]
    calls = {"stream": 0, "device": 0}
    if dev.type == "cuda":
        orig_stream_sync, orig_dev_sync = torch.cuda.Stream.synchronize, torch.cuda.synchronize

        def stream_sync(self):
            calls["stream"] += 1
            return orig_stream_sync(self)

        def dev_sync(*a, **k):
            calls["device"] += 1
            return orig_dev_sync(*a, **k)

    problems = []
    for cuda_aware in modes:
        tr = MpiTransport(comm, timeout=30, device=dev, cuda_aware=cuda_aware)
        for rep in range(3):
            n = 1 << 20
            x = torch.zeros(n, device=dev)
            if dev.type == "cuda":
                torch.cuda._sleep(200_000_000)  # keep the producer stream busy (~0.1 s) before the real values
            x.add_(rep + 7)
            tensors = [x, x.view(1024, -1).t()[::2], (x * 0.5).to(torch.bfloat16).view(64, -1),
                       torch.arange(12, device=dev).view(3, 4) > 5, torch.empty(0, 3, device=dev)]
            expect = [t.cpu().clone() for t in tensors] if dev.type != "cuda" else None
            if dev.type == "cuda":
                torch.cuda.Stream.synchronize, torch.cuda.synchronize = stream_sync, dev_sync
            try:
                pending = tr.send_raw(me, 1, rep, tensors)
            finally:
                if dev.type == "cuda":
                    torch.cuda.Stream.synchronize, torch.cuda.synchronize = orig_stream_sync, orig_dev_sync
            _, batch_id, received = tr.recv_raw(me)
            pending.wait()
            if expect is None:
                expect = [t.cpu() for t in tensors]
            for i, (got, want) in enumerate(zip(received, expect, strict=True)):
                if got.shape != want.shape or got.dtype != want.dtype or not torch.equal(got.cpu(), want):
                    problems.append(f"cuda_aware={cuda_aware} rep {rep} tensor {i}: wrong contents")
            if batch_id != rep:
                problems.append(f"batch id {batch_id} != {rep}")
        if dev.type == "cuda" and not cuda_aware:
            # the side stream, not the compute stream, did the copies
            if not tr._copy_streams:
                problems.append("no side stream was used for the staging copies")
    if calls["stream"] or calls["device"]:
        problems.append(f"send() called Stream.synchronize {calls['stream']}x, torch.cuda.synchronize "
                        f"{calls['device']}x")
    names = ["cuda-aware", "pinned"] if dev.type == "cuda" else ["host"]
    result = {"ok": not problems, "problems": problems, "modes": [names[0] if m else names[-1] for m in modes],
              "device": str(dev)}
    (Path(args.dir) / "transport.json").write_text(json.dumps(result))
    print(json.dumps(result))
    sys.exit(0 if not problems else 1)


# -------------------------------------------------------------------------------------------- reference
def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _eos(tok, folder: str, config) -> list[int]:
    """The ids that end a row, as nesa_hpc.infer.generate.eos_token_ids picks them."""
    from transformers import GenerationConfig

    ids = set()

    def add(v):
        if v is not None:
            ids.update(int(x) for x in (v if isinstance(v, (list, tuple)) else [v]))

    add(tok.eos_token_id)
    try:
        add(GenerationConfig.from_pretrained(folder).eos_token_id)
    except OSError:
        add(getattr(config, "eos_token_id", None))
    return sorted(ids)


def _batches(encoded: list[list[int]], size: int) -> list[tuple[list[int], list[list[int]]]]:
    """(row numbers, token ids) per batch; longest rows first, like data.bucket_window (less padding)."""
    order = sorted(range(len(encoded)), key=lambda r: -len(encoded[r]))
    return [(order[i:i + size], [encoded[r] for r in order[i:i + size]]) for i in range(0, len(order), size)]


def _pad(seqs, pad_id, side, dev):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids.to(dev), mask.to(dev)


def reference(args) -> None:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(args.dir)
    info = json.loads((work / "prepared.json").read_text())
    dev = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    what = set(args.what.split(","))
    folder = info["model"]
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(dev).eval()
    eos = _eos(tok, folder, model.config)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
    name = work / f"ref-{args.dtype}.json"
    out: dict = json.loads(name.read_text()) if name.exists() else {}
    out.update({"dtype": args.dtype, "device": str(dev), "torch": torch.__version__})
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)

    def save(part: str) -> None:  # after each part, so a timeout keeps what was done
        name.write_text(json.dumps(out))
        print(f"{part}: done", flush=True)

    def encode(path):
        return [tok(t)["input_ids"][:info["max_length"]] for t in _rows(work / path)]

    with torch.inference_mode():
        if "score-exact" in what:  # each row alone, no padding
            rows = []
            for ids in encode("exact.jsonl"):
                x = torch.tensor([ids], device=dev)
                logits = model(x).logits[0, :-1].float()
                rows.append(float(F.cross_entropy(logits, x[0, 1:], reduction="sum").double()))
            out["score_nll_sum"] = rows
            save("score-exact")
        if "gen-exact" in what:  # each prompt alone through model.generate(do_sample=False)
            toks, margins = [], []
            for ids in encode("exact.jsonl"):
                x = torch.tensor([ids], device=dev)
                g = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                   max_new_tokens=info["exact_new_tokens"], eos_token_id=eos, pad_token_id=pad_id,
                                   output_scores=True, return_dict_in_generate=True)
                toks.append(g.sequences[0, x.shape[1]:].tolist())
                top2 = [s[0].float().topk(2).values for s in g.scores]
                margins.append([float(v[0] - v[1]) for v in top2])
            out["gen_tokens"], out["gen_margins"] = toks, margins
            save("gen-exact")
        for which, path in (("exact", "exact.jsonl"), ("bench", "bench.jsonl")):
            if f"score-speed:{which}" not in what:  # batched like the job: right padding, longest rows first
                continue
            batches = _batches(encode(path), args.batch_size)
            ids, mask = _pad(batches[0][1], pad_id, "right", dev)
            model(input_ids=ids, attention_mask=mask)  # warm-up
            _sync(dev)
            t0 = time.perf_counter()
            tokens, nll_mean = 0, {}
            for rows, b in batches:
                ids, mask = _pad(b, pad_id, "right", dev)
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none") * mask[:, 1:]
                per_row = (nll.sum(-1).double() / mask[:, 1:].sum(-1).clamp(min=1)).tolist()
                nll_mean.update(zip(rows, per_row, strict=True))
                tokens += int(mask.sum())
            _sync(dev)
            out[f"score_speed_{which}"] = tokens / (time.perf_counter() - t0)
            out[f"score_nll_mean_{which}"] = [nll_mean[r] for r in range(len(nll_mean))]
            save(f"score-speed:{which}")
        for which, path, new in (("exact", "exact.jsonl", info["exact_new_tokens"]),
                                 ("bench", "gen.jsonl", info["gen_new_tokens"])):
            if f"gen-speed:{which}" not in what:  # batched model.generate, left padding
                continue
            batches = _batches(encode(path), args.batch_size)
            ids, mask = _pad(batches[0][1], pad_id, "left", dev)
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=2, eos_token_id=eos,
                           pad_token_id=pad_id)  # warm-up
            _sync(dev)
            t0 = time.perf_counter()
            generated, tokens = 0, {}
            for rows, b in batches:
                ids, mask = _pad(b, pad_id, "left", dev)
                g = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, eos_token_id=eos,
                                   pad_token_id=pad_id)[:, ids.shape[1]:].tolist()
                for r, row in zip(rows, g, strict=True):  # up to and including the first EOS, like n_generated
                    ends = [i for i, t in enumerate(row) if t in eos]
                    tokens[r] = row[:ends[0] + 1] if ends else row
                    generated += len(tokens[r])
            _sync(dev)
            out[f"gen_speed_{which}"] = generated / (time.perf_counter() - t0)
            out[f"gen_tokens_{which}"] = [tokens[r] for r in range(len(tokens))]
            save(f"gen-speed:{which}")
        if "gen-speed-cb:bench" in what:
            out["gen_speed_cb_bench"] = _continuous(model, encode("gen.jsonl"), info["gen_new_tokens"], eos, pad_id,
                                                    dev)
            save("gen-speed-cb:bench")
    print(json.dumps({k: (v if not isinstance(v, list) else f"{len(v)} rows") for k, v in out.items()}))


def _continuous(model, prompts: list[list[int]], new: int, eos: list[int], pad_id: int, dev) -> float:
    """Generated tokens/s of transformers' continuous batching (``ContinuousBatchingManager``: every prompt
    added at once, greedy, ``new`` tokens at most), on the model as loaded (its dtype, its device); tokens
    counted up to and including the first EOS, as ``n_generated``."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=new, eos_token_id=eos, pad_token_id=pad_id)

    def run(batch: list[list[int]]) -> int:
        results: dict[str, list[int]] = {}
        with model.continuous_batching_context_manager(generation_config=config, block=True) as manager:
            ids = [manager.add_request(p, request_id=f"row-{i}", max_new_tokens=new) for i, p in enumerate(batch)]
            while len(results) < len(ids):
                res = manager.get_result(timeout=120)
                if res is None:
                    raise RuntimeError("continuous batching stopped before every request finished")
                if res.is_finished():
                    results[res.request_id] = list(res.generated_tokens)
        total = 0
        for toks in results.values():
            ends = [i for i, t in enumerate(toks[:new]) if t in eos]
            total += ends[0] + 1 if ends else len(toks[:new])
        return total

    run(prompts[:2])  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    generated = run(prompts)
    _sync(dev)
    return generated / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------- report
def _step(work: Path, name: str) -> tuple[str, int | None, float | None, str]:
    """(state, exit code, seconds, last error line) of a step: state ran | skipped | missing."""
    rc_file, log_file = work / "steps" / f"{name}.rc", work / "logs" / f"{name}.log"
    if (work / "steps" / f"{name}.skip").exists():
        return "skipped", None, None, "not run: time budget spent"
    if not rc_file.exists():
        return "missing", None, None, "not run"
    rc, secs = rc_file.read_text().split()
    text = log_file.read_text(errors="replace") if log_file.exists() else ""
    why = ""
    if int(rc) in (124, 137):
        why = f"timed out after {secs} s (exit {rc})"
    elif int(rc) != 0:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "it/s]" not in ln]
        pick = [ln for ln in lines if "error" in ln.lower() or "refused" in ln or "exception" in ln.lower()]
        why = f"exit {rc}: " + (pick[-1] if pick else (lines[-1] if lines else ""))[:160]
    return "ran", int(rc), float(secs), why


def _h5(path: Path) -> tuple[dict, dict]:
    import h5py

    with h5py.File(path, "r") as f:
        attrs = {k: f.attrs[k] for k in f.attrs}
        data = {k: f[k][()] for k in f if isinstance(f[k], h5py.Dataset)}
    return data, attrs


def _fmt(x, spec=".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def report(args) -> None:
    work = Path(args.dir)
    info = json.loads((work / "prepared.json").read_text()) if (work / "prepared.json").exists() else {}
    refs = {d: json.loads((work / f"ref-{d}.json").read_text()) if (work / f"ref-{d}.json").exists() else {}
            for d in ("float32", "bfloat16")}
    plan = [json.loads(ln) for ln in (work / "plan.jsonl").read_text().splitlines() if ln.strip()] \
        if (work / "plan.jsonl").exists() else []
    rows, failed = [], False

    def add(task, ranks, dtype, check, nesa, hf, status, note=""):
        nonlocal failed
        failed |= status == "FAIL"
        ratio = nesa / hf if nesa and hf else None
        rows.append((task, str(ranks), dtype, check, _fmt(nesa), _fmt(hf), _fmt(ratio, ".2f"), status, note))

    for name in ("prepare", "transport", "ref-float32", "ref-bfloat16"):
        state, rc, secs, why = _step(work, name)
        if name == "transport" and state == "ran" and (work / "transport.json").exists():
            t = json.loads((work / "transport.json").read_text())
            check = f"self-send {'+'.join(t['modes'])}: {'ok' if t['ok'] else 'WRONG'}"
            add("transport", 1, "mixed", check, None, None, "PASS" if t["ok"] and rc == 0 else "FAIL",
                "; ".join(t["problems"])[:160])
        elif state != "ran" or rc != 0:
            add(name, "-", "-", "step", None, None, "FAIL" if state == "ran" else "SKIP", why)
    train_ref: dict[str, list[float]] = {}
    for step in plan:
        task, n, dtype = step["task"], step["ranks"], step["dtype"]
        short = {"float32": "fp32", "bfloat16": "bf16"}[dtype]
        ref = refs[dtype]
        state, rc, secs, why = _step(work, step["name"])
        if state != "ran" or rc != 0:
            add(task, n, short, "-", None, None, "FAIL" if state == "ran" else "SKIP", why or state)
            continue
        try:
            if task == "train":
                summary = json.loads((Path(step["train_dir"]) / "summary.json").read_text())
                metrics = [json.loads(ln) for ln in (Path(step["train_dir"]) / "metrics.jsonl").read_text()
                           .splitlines() if ln.strip()]
                losses = [m["loss"] for m in metrics]
                base = train_ref.setdefault(dtype, losses)
                if len(losses) != len(base):
                    add(task, n, short, f"{len(losses)} steps vs {len(base)}", summary.get("tokens_per_s"), None,
                        "FAIL")
                    continue
                rel = max((abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, base, strict=True)), default=0.0)
                ok = rel <= TOL_TRAIN_REL
                label = "reference run" if base is losses else f"loss rel diff vs first run {rel:.1e}"
                add(task, n, short, label, summary.get("tokens_per_s"), None, "PASS" if ok else "FAIL",
                    "losses " + ", ".join(f"{x:.6f}" for x in losses))
                continue
            data, attrs = _h5(Path(step["output"]))
            order = [int(r) for r in data["row"]]
            if task == "score":
                nesa_speed = float(attrs["tokens"]) / float(attrs["seconds"])
                hf_speed = ref.get("score_speed_exact" if step["data"] == "exact" else "score_speed_bench")
                if step["exact"]:
                    want = ref.get("score_nll_sum")
                    if want is None:
                        add(task, n, short, "no transformers reference", nesa_speed, hf_speed, "FAIL")
                        continue
                    diffs = [abs(float(data["nll_sum"][i]) - want[r]) for i, r in enumerate(order)]
                    bound = [max(TOL_SCORE_ABS, TOL_SCORE_REL * abs(want[r])) for r in order]
                    ok = len(order) == len(want) and all(d <= b for d, b in zip(diffs, bound, strict=True))
                    add(task, n, short, f"max |nll_sum diff| {max(diffs):.2e}", nesa_speed, hf_speed,
                        "PASS" if ok else "FAIL", f"{len(order)}/{len(want)} rows")
                else:  # bf16: other batching gives other rounding, so only a sanity bound on nll_mean
                    want = ref.get("score_nll_mean_bench")
                    got = [float(v) for v in data["nll_mean"]]
                    if want is None or len(want) != len(got):
                        ok = len(got) > 0 and all(math.isfinite(v) for v in got)
                        add(task, n, short, "no transformers rows", nesa_speed, hf_speed, "PASS" if ok else "FAIL")
                        continue
                    diff = max(abs(got[i] - want[r]) for i, r in enumerate(order))
                    add(task, n, short, f"max |nll_mean diff| {diff:.2e}", nesa_speed, hf_speed,
                        "PASS" if diff <= TOL_BF16_NLL_MEAN else "FAIL", f"bound {TOL_BF16_NLL_MEAN}")
            elif task == "generate":
                nesa_speed = float(attrs.get("generated_per_s", float("nan")))
                hf_speed = ref.get("gen_speed_exact" if step["data"] == "exact" else "gen_speed_bench")
                got = [[int(t) for t in ids] for ids in data["generated_ids"]]
                if step["exact"]:
                    want, margins = ref.get("gen_tokens"), ref.get("gen_margins")
                    if want is None:
                        add(task, n, short, "no transformers reference", nesa_speed, hf_speed, "FAIL")
                        continue
                    equal = ties = 0
                    for i, r in enumerate(order):
                        if got[i] == want[r]:
                            equal += 1
                            continue
                        j = next((k for k, (a, b) in enumerate(zip(got[i], want[r], strict=False)) if a != b),
                                 min(len(got[i]), len(want[r])))
                        if j < len(margins[r]) and margins[r][j] <= TIE_MARGIN:
                            ties += 1  # transformers' own top-2 logits were within the margin there
                    ok = len(order) == len(want) and equal + ties == len(want)
                    check = f"tokens equal: {'yes' if equal == len(want) else 'no'} ({equal}/{len(want)} rows" + \
                        (f", {ties} at a near-tie)" if ties else ")")
                    add(task, n, short, check, nesa_speed, hf_speed, "PASS" if ok else "FAIL")
                else:  # bf16: batched transformers pads differently, so equal tokens are informational only
                    want = ref.get("gen_tokens_bench")
                    ok = len(got) > 0 and all(len(g) > 0 for g in got)
                    same = sum(got[i] == want[r] for i, r in enumerate(order)) if want and len(want) == len(got) \
                        else None
                    check = f"same tokens {same}/{len(got)} rows" if same is not None else "no transformers rows"
                    # the strongest one-process baseline: transformers' continuous batching on the same GPU
                    cb = ref.get("gen_speed_cb_bench")
                    note = f"{sum(map(len, got))} tokens generated (bf16: equality not required); " + \
                        (f"tok/s hf = continuous batching (static generate {_fmt(hf_speed)})" if cb else
                         "tok/s hf = static generate (no continuous-batching figure)")
                    add(task, n, short, check, nesa_speed, cb or hf_speed, "PASS" if ok else "FAIL", note)
        except Exception as exc:  # noqa: BLE001 - a broken output is a failed row, not a crashed report
            add(task, n, short, "unreadable output", None, None, "FAIL", f"{type(exc).__name__}: {exc}"[:160])

    head = ("task", "ranks", "dtype", "check vs transformers", "tok/s nesa", "tok/s hf", "ratio", "status", "note")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = "  ".join("{:<%d}" % w for w in widths)
    print()
    print(f"model: {info.get('label', '?')} ({info.get('model', '?')}), device {args.device}; "
          f"tokens/s: score = tokens/s, generate = generated tokens/s, train = tokens/s (summary.json)")
    print(line.format(*head))
    print(line.format(*("-" * w for w in widths)))
    for r in rows:
        print(line.format(*r).rstrip())
    print()
    n_fail = sum(r[7] == "FAIL" for r in rows)
    n_skip = sum(r[7] == "SKIP" for r in rows)
    print(f"{len(rows) - n_fail - n_skip} passed, {n_fail} failed, {n_skip} skipped; logs in {work}/logs")
    sys.exit(1 if failed else 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("dir")
    p.add_argument("--model", default="auto")
    p.add_argument("--profile", choices=sorted(PROFILES), default="gpu")
    p = sub.add_parser("transport")
    p.add_argument("dir")
    p.add_argument("--device", default="cuda")
    p = sub.add_parser("reference")
    p.add_argument("dir")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--what", default="score-exact,gen-exact")
    p.add_argument("--batch-size", type=int, default=8)
    p = sub.add_parser("report")
    p.add_argument("dir")
    p.add_argument("--device", default="cuda")
    args = ap.parse_args()
    {"prepare": prepare, "transport": transport, "reference": reference, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
