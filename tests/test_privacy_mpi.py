"""Noise is added on rank 0 only, exactly once per release: what rank 1 receives is one application of the
transform to rank 0's layer-k states, and the results do not depend on the world size."""

from __future__ import annotations

import json
import math

import pytest
from conftest import MPI_SCRIPT, run_mpi


def _cases(models: dict, data: str) -> list[dict]:
    base = {"task": "score", "head": "owner", "data": data, "privacy_check": True, "batch_size": 3}
    return [
        {**base, "model": str(models["llama"]), "k": 2, "padding": "right",
         "extra": {"privacy": "gaussian", "privacy.epsilon": 4.0, "privacy.seed": 7}},
        {**base, "model": str(models["gpt2"]), "k": 0, "padding": "left", "head": "last",
         "extra": {"privacy": "gaussian", "privacy.unit": "token", "privacy.clip": 1.5, "privacy.epsilon": 20.0,
                   "privacy.delta": 1e-6, "privacy.seed": 3}},
        {**base, "model": str(models["llama"]), "k": 1, "padding": "right",
         "extra": {"privacy": "sigma", "privacy.sigma": 0.05, "privacy.seed": 5}},
        {**base, "model": str(models["llama"]), "k": 0, "padding": "left",
         "extra": {"privacy": "dchi", "privacy.epsilon": 300.0, "privacy.seed": 9}},
    ]


@pytest.fixture(scope="module")
def reports(tiny_models, tmp_path_factory):
    data = tmp_path_factory.mktemp("pdata") / "rows.jsonl"
    texts = ["short", "a somewhat longer row of plain words", "x y", "the quick brown fox jumps over the lazy dog",
             "numbers 1 2 3 4 5", "hello world again and again"]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = {}
    for n in (1, 2, 3):
        folder = tmp_path_factory.mktemp(f"p{n}")
        spec = folder / "spec.json"
        spec.write_text(json.dumps(_cases(tiny_models, str(data))))
        proc = run_mpi(n, ["-m", "mpi4py", str(MPI_SCRIPT), str(spec), str(folder / "report.json")], timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out[n] = json.loads((folder / "report.json").read_text())
    return out


def test_workers_receive_exactly_one_application_of_the_noise(reports):
    for n in (2, 3):
        for e in reports[n]:
            label = (n, e["case"]["extra"])
            assert e["error"] is None, (label, e["error"])
            assert e["messages_checked"] >= 2, label
            # rank 1 got the transform of rank 0's states, bit for bit up to float noise of the comparison
            assert e["max_diff_states"] <= 1e-5 * max(1.0, e["max_abs_states"]), (label, e["max_diff_states"])
            # padded positions are sent as zeros (at k>0 they would carry the row's content)
            assert e["max_abs_padding"] == 0.0, label


def test_results_do_not_depend_on_the_world_size(reports):
    for one, two, three in zip(reports[1], reports[2], reports[3], strict=True):
        assert one["error"] is None and one["complete"], one["error"]
        assert one["rows"] == two["rows"] == three["rows"] == list(range(6))
        for other in (two, three):
            for a, b in zip(one["values"], other["values"], strict=True):
                assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-5, abs=1e-6)
        # noise of the size calibrated moves the scores away from a noise-free run's (sanity: it is applied)
        assert one["attrs"]["privacy_sigma"] > 0 or one["attrs"]["privacy_mechanism"] == "dchi"


def test_ledger_attributes(reports):
    gauss, token, sigma, dchi = reports[2]
    a = gauss["attrs"]
    assert a["privacy_mechanism"] == "gaussian" and a["privacy_unit"] == "sequence"
    assert a["privacy_seed"] == 7 and a["privacy_releases"] == 1 and a["privacy_delta"] == 1e-5
    assert a["privacy_clip"] > 0 and "percentile 90" in a["privacy_clip_source"]
    assert a["privacy_epsilon_spent"] == pytest.approx(4.0, rel=1e-3)
    assert gauss["epsilon_spent"] == pytest.approx([a["privacy_epsilon_spent"]] * 6)
    assert token["attrs"]["privacy_unit"] == "token" and token["attrs"]["privacy_clip"] == 1.5
    assert token["attrs"]["privacy_epsilon_spent"] == pytest.approx(20.0, rel=1e-3)
    assert sigma["attrs"]["privacy_sigma"] == 0.05 and math.isnan(sigma["attrs"]["privacy_epsilon_spent"])
    assert dchi["epsilon_spent"] == [300.0] * 6 and "metric DP" in dchi["attrs"]["privacy_guarantee"]


def test_a_failed_job_records_the_rows_it_sent_but_never_committed(tiny_models, tmp_path):
    """A bad row that ends the job while batches are in flight: those rows were released, and the file
    says so (count, most releases, epsilon) although they are not in `row`."""
    import h5py
    from conftest import ROOT

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"text": f"row number {i} of plain words"}) + "\n" for i in range(40))
                    + "{not json\n")
    out = tmp_path / "out.h5"
    proc = run_mpi(2, [str(ROOT / "jobs" / "infer.py"), f"model.path={tiny_models['llama']}", f"data.path={data}",
                       "split.k=1", "privacy=gaussian", "privacy.epsilon=50", "privacy.clip=5.0", "privacy.seed=1",
                       "data.batch_size=2", "data.bucket_window=0", "runtime.inflight=4", f"output.path={out}",
                       "runtime.threads=1"], timeout=300, own_launch=True)
    assert proc.returncode != 0 and "malformed JSON" in proc.stderr
    with h5py.File(out) as f:
        attrs, committed = dict(f.attrs), len(f["row"])
    assert not attrs["complete"] and committed < 40
    assert attrs["privacy_uncommitted_rows"] >= 1 and committed + attrs["privacy_uncommitted_rows"] <= 40
    assert attrs["privacy_uncommitted_releases"] == 1 and math.isfinite(attrs["privacy_uncommitted_epsilon"])
    assert "privacy_uncommitted_rows" in proc.stderr
