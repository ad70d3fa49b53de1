"""What the cryptographic noise generator costs: ``Privacy.apply`` (ChaCha20, one stream per position)
against the same Gaussian noise drawn from PCG64 (one stream per row and release), on rank 0's shapes.

    python scripts/noise_cost.py [--out noise_cost.json]

Prints a table (milliseconds per call, median of repeats, one thread) and writes it as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time

import numpy as np
import torch

from nesa_hpc.io import jsonfile
from nesa_hpc.privacy.mechanism import PrivacySpec, make_privacy

SHAPES = {"prompt batch (16 rows x 64 tokens)": (16, 64), "decode step (16 rows x 1 token)": (16, 1),
          "long prompt (4 rows x 512 tokens)": (4, 512)}


def _pcg64(privacy, z: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The same clip and Gaussian noise, the bits from PCG64 seeded per (row, release)."""
    H = z.shape[-1]
    noise = torch.zeros_like(z, dtype=torch.float64)
    for i, r in enumerate(rows.tolist()):
        m = mask[i].bool()
        seed = hashlib.blake2b(privacy.key + f":{r}:0".encode(), digest_size=16).digest()
        rng = np.random.Generator(np.random.PCG64(int.from_bytes(seed, "little")))
        noise[i][m] = torch.from_numpy(rng.standard_normal((int(m.sum()), H)) * privacy.sigma)
    return z + noise.to(z.dtype)


def _time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="noise_cost.json")
    parser.add_argument("--hidden", type=int, default=576, help="hidden size (576: SmolLM2-135M)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = PrivacySpec("gaussian", unit="sequence", epsilon=8.0, delta=1e-5, clip=1.0)
    rows_out = []
    for name, (B, T) in SHAPES.items():
        privacy = make_privacy(spec, k=2)
        z = torch.randn(B, T, args.hidden)
        mask, rows = torch.ones(B, T, dtype=torch.long), torch.arange(B)
        digests = [b"d"] * B
        chacha = _time(lambda p=privacy, z=z, m=mask, r=rows, d=digests: p.apply(z, m, r, digests=d), args.repeats)
        pcg = _time(lambda p=privacy, z=z, m=mask, r=rows: _pcg64(p, z, m, r), args.repeats)
        rows_out.append({"shape": name, "chacha20_ms": chacha, "pcg64_ms": pcg, "ratio": chacha / pcg,
                         "extra_ms_per_token": (chacha - pcg) / (B * T)})
    print("| shape | ChaCha20 (ms) | PCG64 (ms) | ratio | extra ms per token |\n|---|---:|---:|---:|---:|")
    for r in rows_out:
        print(f"| {r['shape']} | {r['chacha20_ms']:.2f} | {r['pcg64_ms']:.2f} | {r['ratio']:.2f} | "
              f"{r['extra_ms_per_token']:.4f} |")
    with open(args.out, "w") as fh:
        fh.write(jsonfile.dumps({"hidden": args.hidden, "threads": 1, "rows": rows_out}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
