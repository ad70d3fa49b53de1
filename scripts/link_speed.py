"""Throughput of the pipeline across three simulated hosts with the links between them limited in rate.

    python scripts/link_speed.py                         # needs root: starts scripts/sim_cluster.py's cluster
    python scripts/link_speed.py --rates unshaped,1gbit,10mbit --dtypes float32 --tasks score

For every link rate (``tc`` token bucket on both ends of each host's link: the bridge port and the host's
own interface), every task and every ``runtime.wire_dtype``, ``jobs/infer.py`` runs on three hosts, one rank
each (``srun -N 3``), with the packaged SmolLM2-135M in float32, ``split.k=2``, the balanced partition and
one thread per rank. The table gives tokens/s (score: scored tokens; generate: generated tokens), the
ratio to the unshaped link, and the bytes rank 0 sent per token (``rank_stats``' ``bytes_sent``); the JSON
(``--out``) holds every run. This kernel has no ``netem``: a link's delay cannot be set here, only its rate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from sim_cluster import ClusterUnavailable, SimCluster  # noqa: E402

TASKS = {
    "score": ["task=score", "data.batch_size=8"],
    "generate": ["task=generate", "task.max_new_tokens=32", "data.batch_size=8", "data.max_length=128"],
}


def rows_file(folder: Path, rows: int) -> Path:
    """The first `rows` rows of the shipped sample data (repeated when it has fewer)."""
    from nesa_hpc.io.read import read_rows, sample_path

    texts = [t for _, t in read_rows(sample_path())]
    path = folder / f"rows{rows}.jsonl"
    path.write_text("".join(json.dumps({"text": texts[i % len(texts)]}) + "\n" for i in range(rows)))
    return path


def run_one(cluster: SimCluster, task: str, dtype: str, data: Path, out: Path, env: dict) -> dict:
    from nesa_hpc.io.results import read_results

    cmd = ["srun", "--mpi=pmi2", "-N", "3", "--ntasks-per-node=1", "--cpus-per-task=1", sys.executable,
           str(ROOT / "jobs" / "infer.py"), *TASKS[task], f"data.path={data}", f"output.path={out}",
           "output.overwrite=true", f"runtime.wire_dtype={dtype}", "runtime.threads=1", "split.k=2",
           "split.partition=balanced", "runtime.timeout=600"]
    start = time.monotonic()
    proc = cluster.run(cmd, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{task} {dtype}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    _, attrs = read_results(out)
    ranks = json.loads(attrs["rank_stats"]) if isinstance(attrs["rank_stats"], str) else attrs["rank_stats"]
    hosts = sorted({r["host"] for r in ranks})
    counted = attrs["generated_this_run"] if task == "generate" else attrs["tokens"]
    rate = attrs["generated_per_s"] if task == "generate" else attrs["tokens"] / attrs["seconds"]
    return {"task": task, "wire_dtype": dtype, "tokens": int(counted), "seconds": float(attrs["seconds"]),
            "tokens_per_s": round(float(rate), 2), "hosts": hosts, "wall_s": round(time.monotonic() - start, 1),
            "bytes_sent": [int(r["bytes_sent"]) for r in ranks],
            "rank0_bytes_per_token": round(int(ranks[0]["bytes_sent"]) / max(int(counted), 1), 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="unshaped,10gbit,1gbit,100mbit,10mbit",
                    help="link rates in tc syntax; 'unshaped' = no limit")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    ap.add_argument("--tasks", default="score,generate")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench_results/link_speed.json"))
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="nesa-link-"))
    cluster = SimCluster(work / "cluster", hosts=3, cpus=1)
    try:
        cluster.start()
    except ClusterUnavailable as exc:
        print(f"link_speed: {exc}", file=sys.stderr)
        return 2
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    results = []
    try:
        data = rows_file(work, args.rows)
        for rate in args.rates.split(","):
            for host in cluster.hosts:
                cluster.shape(host, None if rate == "unshaped" else rate)
            for task in args.tasks.split(","):
                for dtype in args.dtypes.split(","):
                    r = run_one(cluster, task, dtype, data, work / "out.h5", env)
                    r["rate"] = rate
                    results.append(r)
                    print(f"{rate:>9} {task:>8} {dtype:>9}: {r['tokens_per_s']:8.1f} tokens/s, "
                          f"{r['rank0_bytes_per_token']:.0f} B/token sent by rank 0", flush=True)
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    base = {(r["task"], r["wire_dtype"]): r["tokens_per_s"] for r in results if r["rate"] == "unshaped"}
    print("\n| link | task | wire dtype | tokens/s | of unshaped | B/token sent by rank 0 |")
    print("|---|---|---|---:|---:|---:|")
    for r in results:
        ref = base.get((r["task"], r["wire_dtype"]))
        r["of_unshaped"] = round(r["tokens_per_s"] / ref, 3) if ref else None
        share = f"{100 * r['of_unshaped']:.0f}%" if r["of_unshaped"] is not None else "-"
        print(f"| {r['rate']} | {r['task']} | {r['wire_dtype']} | {r['tokens_per_s']:.1f} | {share} | "
              f"{r['rank0_bytes_per_token']:.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(["python", "scripts/link_speed.py", *(argv or sys.argv[1:])]),
                                    "model": "SmolLM2-135M-Instruct (packaged), float32, split.k=2, balanced",
                                    "rows": args.rows, "runs": results}, indent=1, allow_nan=False))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
