"""runtime.device=cuda: a clear error where no GPU is usable; on a GPU machine, GPU ranks against CPU ranks.

The GPU comparisons skip without CUDA. With one GPU, several ranks share it over the MPI transport
(activations staged through pinned host memory unless the MPI is CUDA-aware); NCCL between ranks needs
one GPU per rank (tests/test_transport_torch.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ROOT, run_mpi

from nesa_hpc.io.results import read_results

INFER = str(ROOT / "jobs" / "infer.py")
HAS_CUDA = torch.cuda.is_available()


def _infer(n, model, data, out, *extra):
    return run_mpi(n, [INFER, f"model.path={model}", f"data.path={data}", f"output.path={out}", "runtime.threads=1",
                       "data.batch_size=3", "runtime.timeout=60", *extra], timeout=240)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a usable GPU")
def test_cuda_without_a_gpu_ends_every_rank_with_one_message(tiny_models, texts_file, tmp_path):
    out = tmp_path / "out.h5"
    proc = _infer(2, tiny_models["llama"], texts_file, out, "runtime.device=cuda")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "runtime.device=cuda, but no GPU is usable" in proc.stderr
    assert proc.stderr.count("error:") == 1
    assert not out.exists()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("extra", [
    ["runtime.device=cuda"],
    ["runtime.device=cuda", "runtime.owner_device=cpu"],
    ["runtime.device=cuda", "runtime.cuda_aware_mpi=false", "split.head=last"],
])
def test_gpu_ranks_match_cpu_ranks(tiny_models, texts_file, tmp_path, extra):
    cpu, gpu = tmp_path / "cpu.h5", tmp_path / "gpu.h5"
    args = ("split.head=last",) if "split.head=last" in extra else ()
    ref = _infer(3, tiny_models["llama"], texts_file, cpu, *args)
    assert ref.returncode == 0, ref.stderr[-3000:]
    proc = _infer(3, tiny_models["llama"], texts_file, gpu, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cuda:" in proc.stderr  # the layer map names each rank's device
    a, b = read_results(cpu)[0], read_results(gpu)[0]
    assert a["row"].tolist() == b["row"].tolist() and np.array_equal(a["n_tokens"], b["n_tokens"])
    np.testing.assert_allclose(b["nll_mean"], a["nll_mean"], rtol=1e-4, atol=1e-4)
