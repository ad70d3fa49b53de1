"""Peak memory of each rank against the weights it holds, on a Llama-shaped model larger than the packaged ones.

    python scripts/memory_bound.py                       # ~1.1B parameters, fp32 and bf16, 4 ranks
    python scripts/memory_bound.py --layers 4 --hidden 512 --intermediate 1408 --ranks 3 --dtypes float32

The model (random weights, TinyLlama's shape by default, SmolLM2's tokenizer) is written once into
``--work``, tensor by tensor into safetensors shards, so the script itself never holds it whole. Then
``jobs/infer.py`` scores a few rows at each ``model.dtype`` on ``--ranks`` ranks, and the results file's
``rank_stats`` give each rank's peak RSS. A rank's share is the bytes of the checkpoint tensors of the
modules it holds (rank 0: the embeddings, the final norm and the head; a worker: its layer block), at the
run's dtype. The table shows share, peak RSS and what is left (the process: Python, torch, transformers, the
MPI library, the tokenizer on rank 0, activations). Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def write_model(folder: Path, args) -> None:
    """A Llama-shaped model with random weights (std 0.02), written one tensor at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from nesa_hpc.models.weights import packaged_model_path

    if (folder / "model.safetensors.index.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(packaged_model_path("smollm2-135m-instruct"))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         torch_dtype="float32")
    with torch.device("meta"):
        shapes = [(name, tuple(p.shape)) for name, p in LlamaForCausalLM(config).named_parameters()]
    gen = torch.Generator().manual_seed(0)
    index, shard, size, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, folder / name, metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, size, n = {}, 0, n + 1

    for name, shape in shapes:
        t = torch.randn(shape, generator=gen) * 0.02 if len(shape) > 1 else torch.ones(shape)
        shard[name] = t.contiguous()
        size += t.numel() * 4
        if size >= 1 << 30:
            flush()
    flush()
    total = sum(int(torch.tensor(s).prod()) for _, s in shapes) * 4
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": index}))
    config.save_pretrained(folder)
    tok.save_pretrained(folder)


def tensor_numels(folder: Path) -> dict[str, int]:
    from safetensors import safe_open

    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for name in sorted(set(index.values())):
        with safe_open(folder / name, "pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= d
                out[key] = n
    return out


def shares(numels: dict[str, int], attrs: dict, dtype: str) -> list[int]:
    """Bytes of the tensors each rank holds (head on rank 0: split.head=owner)."""
    ranges = json.loads(attrs["layer_ranges"]) if isinstance(attrs["layer_ranges"], str) else attrs["layer_ranges"]
    out = [0] * len(ranges)
    for key, n in numels.items():
        m = re.search(r"\.layers\.(\d+)\.", key)
        rank = 0 if m is None else next(r for r, (a, b) in enumerate(ranges) if a <= int(m.group(1)) < b)
        out[rank] += n * DTYPE_BYTES[dtype]
    return out


def run(folder: Path, dtype: str, ranks: int, k: int, out: Path) -> dict:
    import h5py

    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    cmd = [mpiexec, "-n", str(ranks), sys.executable, str(ROOT / "jobs" / "infer.py"), f"model.path={folder}",
           f"model.dtype={dtype}", "task=score", f"split.k={k}", "data.max_length=64", "data.batch_size=4",
           "runtime.threads=1", f"output.path={out}", "output.overwrite=true"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with h5py.File(out) as f:
        attrs = {k: f.attrs[k] for k in ("layer_ranges", "rank_stats")}
    stats = json.loads(attrs["rank_stats"]) if isinstance(attrs["rank_stats"], str) else attrs["rank_stats"]
    return {"attrs": attrs, "peak_mb": [r["peak_rss_mb"] for r in stats], "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/nesa-memory-model"))
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--k", type=int, default=1, help="split.k: layers on rank 0")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--out", type=Path, default=Path("bench_memory.json"))
    args = p.parse_args()
    folder = args.work / f"llama-{args.layers}x{args.hidden}"
    t0 = time.perf_counter()
    write_model(folder, args)
    numels = tensor_numels(folder)
    params = sum(numels.values())
    print(f"model: {folder} ({params / 1e9:.2f}B parameters, written in {time.perf_counter() - t0:.0f} s)")
    rows = []
    for dtype in args.dtypes.split(","):
        r = run(folder, dtype, args.ranks, args.k, args.work / f"out-{dtype}.h5")
        for rank, (share, peak) in enumerate(zip(shares(numels, r["attrs"], dtype), r["peak_mb"], strict=True)):
            rows.append({"dtype": dtype, "rank": rank, "share_mb": round(share / 2**20, 1), "peak_rss_mb": peak,
                         "rest_mb": round(peak - share / 2**20, 1), "seconds": round(r["seconds"], 1)})
    print(f"{'dtype':>9} {'rank':>4} {'share MB':>9} {'peak RSS MB':>12} {'rest MB':>8}")
    for row in rows:
        print(f"{row['dtype']:>9} {row['rank']:>4} {row['share_mb']:>9.0f} {row['peak_rss_mb']:>12.0f} "
              f"{row['rest_mb']:>8.0f}")
    args.out.write_text(json.dumps({"parameters": params, "ranks": args.ranks, "k": args.k,
                                    "shape": {k: getattr(args, k) for k in ("layers", "hidden", "intermediate",
                                                                            "heads", "kv_heads")},
                                    "host": os.uname().nodename, "rows": rows}, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
