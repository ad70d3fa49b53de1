"""runtime.transport=torch (torch.distributed, rendezvous over MPI) against runtime.transport=mpi."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import ROOT, run_mpi

CHECK = str(ROOT / "tests" / "transport_check.py")
INFER = str(ROOT / "jobs" / "infer.py")


def _cases(models, data) -> list[list[str]]:
    common = [f"data.path={data}", "runtime.threads=1", "data.batch_size=3", "data.max_length=16",
              "runtime.timeout=60"]
    return [
        [f"model.path={models['llama']}", "task=score", "split.k=2", *common],
        [f"model.path={models['gpt2']}", "task=embed", "split.k=1", "split.head=last", "data.padding_side=left",
         "runtime.wire_dtype=bfloat16", *common],
    ]


def _run_check(tmp_path, device: str, ranks: int, cases: list[list[str]]) -> dict:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"device": device, "cases": cases}))
    report = tmp_path / "report.json"
    proc = run_mpi(ranks, ["-m", "mpi4py", CHECK, str(spec), str(report)], timeout=300)  # -m mpi4py: abort on error
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(report.read_text())


def _assert_report(report: dict, cases: list[list[str]]) -> None:
    assert report["torch_messages"] is None, report["torch_messages"]
    assert report["mpi_messages"] is None, report["mpi_messages"]
    waited = report["torch_deadline_s"][1]
    assert 0.9 <= waited < 10, f"a receive with a 1 s deadline failed after {waited} s"
    assert len(report["cases"]) == len(cases)
    for case in report["cases"]:
        assert case["rows"] == 9
        assert case["differ"] == [], f"{case['overrides']}: datasets differ between transports: {case['differ']}"


def test_gloo_transport_equals_mpi_transport(tiny_models, texts_file, tmp_path):
    cases = _cases(tiny_models, texts_file)
    _assert_report(_run_check(tmp_path, "cpu", 3, cases), cases)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 3,
                    reason="NCCL needs one GPU per rank: 3 GPUs on this node")
def test_nccl_transport_equals_mpi_transport_on_gpus(tiny_models, texts_file, tmp_path):
    cases = _cases(tiny_models, texts_file)
    _assert_report(_run_check(tmp_path, "cuda", 3, cases), cases)


def test_unreachable_rendezvous_ends_every_rank_with_one_message(tiny_models, texts_file, tmp_path):
    out = tmp_path / "out.h5"
    start = time.monotonic()
    # 192.0.2.1 (TEST-NET-1) is never routed: the workers cannot reach the store that rank 0 started
    proc = run_mpi(3, [INFER, f"model.path={tiny_models['llama']}", f"data.path={texts_file}", f"output.path={out}",
                       "runtime.threads=1", "runtime.transport=torch", "runtime.timeout=2"],
                   env={"MASTER_ADDR": "192.0.2.1"}, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "cannot reach rank 0's rendezvous store at 192.0.2.1:" in proc.stderr
    assert "set MASTER_ADDR" in proc.stderr and proc.stderr.count("error:") == 1
    assert time.monotonic() - start < 90
    assert not out.exists()
