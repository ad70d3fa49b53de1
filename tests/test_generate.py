"""task=generate across the pipeline equals transformers ``generate`` token for token, for every world size."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, run_jobs, run_mpi, world_share

from nesa_hpc.infer.generate import Decoding, pick_tokens, row_generator

SCRIPT = ROOT / "tests" / "mpi_generate.py"
NUM_LAYERS = 6  # the tiny models in conftest


def _grid(n: int, models: dict, data: str) -> list[dict]:
    cases = []
    for family, folder in models.items():
        for k in (0, 1, 3, NUM_LAYERS):
            if n > 1 and 0 < NUM_LAYERS - k < n - 1:
                continue  # not enough layers left to give every worker one
            for head in ("owner", "last"):
                cases.append({"model": str(folder), "k": k, "head": head, "data": data, "family": family})
    return cases


def _cases(n: int, models: dict, data: str) -> list[dict]:
    """Each (model, k, head) of the grid at one world size, taken in turn (``world_share(once=True)``: every
    k and head placement of each model still runs at several world sizes); the batching, chunking and
    sampling cases below at every world size."""
    cases = world_share(lambda m: _grid(m, models, data), n, lambda c: c["family"], once=True)
    llama = str(models["llama"])
    # one group at a time, batches of 3 (rows finish at different steps inside a group)
    cases.append({"model": llama, "k": 2, "head": "owner", "data": data, "batch_size": 3,
                  "extra": {"runtime.inflight": 1, "data.bucket_window": 0}})
    # two groups in flight, batches of 2: once rows end with EOS, a third group starts before either is done
    # (runtime.turns=false: lanes side by side, as on ranks of different nodes or GPUs)
    cases.append({"model": str(models["gpt2"]), "k": 1, "head": "owner", "data": data, "batch_size": 2,
                  "extra": {"runtime.inflight": 2, "data.bucket_window": 0, "runtime.turns": False}, "refill": True})
    if n > 1:  # the owner runs tail layers before its head: the last worker returns the whole prompt once
        cases.append({"model": llama, "k": 1, "head": "owner", "data": data, "extra": {"split.owner_tail": 2}})
        # prompts in chunks of 4 tokens over several steps, beside running rows, through the owner's tail
        cases.append({"model": llama, "k": 1, "head": "owner", "data": data,
                      "extra": {"split.owner_tail": 1, "runtime.prefill_tokens": 4}})
    # once no row waits, a lane deals its running rows over the idle lanes (rows end with EOS at different steps)
    cases.append({"model": str(models["gpt2"]), "k": 1, "head": "owner", "data": data, "batch_size": 6,
                  "extra": {"runtime.inflight": 3, "data.bucket_window": 0, "runtime.turns": False}, "spread": True})
    # prompts in chunks of 3 (rank 0's layers keep a cache of the filling rows) and, with the head on the
    # last worker, of 5 in one lane
    cases.append({"model": llama, "k": 2, "head": "owner", "data": data, "extra": {"runtime.prefill_tokens": 3}})
    cases.append({"model": str(models["gpt2"]), "k": 1, "head": "last", "data": data,
                  "extra": {"runtime.prefill_tokens": 5, "runtime.inflight": 1}})
    # sampling: must equal the same job at world size 1
    cases.append({"model": llama, "k": 1, "head": "owner", "data": data, "max_new_tokens": 8,
                  "extra": {"task.temperature": 0.8, "task.top_k": 50, "task.top_p": 0.9, "task.seed": 7}})
    cases.append({"model": str(models["gpt2"]), "k": 2, "head": "last", "data": data, "max_new_tokens": 8,
                  "extra": {"task.temperature": 1.3, "task.seed": 3}})
    return cases


def _run(n: int, cases: list[dict], tmp_path, timeout: float = 600) -> list[dict]:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(cases))
    report = tmp_path / "report.json"
    proc = run_mpi(n, ["-m", "mpi4py", str(SCRIPT), str(spec), str(report)], timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(report.read_text())


def _check(entries: list[dict], n: int) -> None:
    assert entries
    for e in entries:
        label = {k: v for k, v in e["case"].items() if k not in ("model", "data")}
        assert e["error"] is None, (label, e["error"])
        assert e["complete"], label
        assert e["rows"] == sorted(e["rows"]), label
        assert e["mismatched_rows"] == [], (label, e["mismatched_rows"])
        assert e["wire_error"] is None, (label, e["wire_error"])
        assert n == 1 or e["worker_messages"] > 0, label
        max_new = e["case"].get("max_new_tokens", 12)
        chunk = e["case"].get("extra", {}).get("runtime.prefill_tokens", 512)
        for gen, rel, reason, tokens, prompt in zip(e["n_generated"], e["n_releases"], e["finish_reason"],
                                                    e["tokens"].values(), e["n_prompt_tokens"], strict=True):
            assert gen == len(tokens) >= 1, label
            # each chunk of the prompt is one release, then every decode step that sent the row's new position
            assert rel == gen - 1 + -(-prompt // chunk), (label, rel, gen, prompt)
            assert reason in ("eos", "length"), label
            assert (reason == "eos") == (tokens[-1] in e["eos_token_ids"]), label
            assert reason == "eos" or gen == max_new, label


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_greedy_equals_transformers_every_split(n, tiny_models, texts_file, tmp_path):
    """Greedy output equals transformers generate on each prompt alone (no padding), on both tiny models,
    several k, both head placements, prompts of different lengths in one batch; sampling with a fixed
    seed gives the same tokens as the same job at world size 1."""
    entries = _run(n, _cases(n, tiny_models, str(texts_file)), tmp_path)
    _check(entries, n)
    greedy = [e for e in entries if e["attrs"]["decoding"] == "greedy"]
    sampled = [e for e in entries if e["attrs"]["decoding"] == "sample"]
    assert greedy and len(sampled) == 2
    # the GPT-2 model ends some rows with EOS right away: rows finish at different steps
    assert any("eos" in e["finish_reason"] and "length" in e["finish_reason"] for e in greedy)
    # continuous batching: a finished row's slot takes the next prompt at the lane's next step, so the lanes
    # need fewer steps than fixed groups of the same size, each of which runs until its longest row ends
    (refill,) = [e for e in entries if e["case"].get("refill")]
    lengths = refill["n_generated"]
    fixed = sum(max(lengths[i:i + 2]) for i in range(0, len(lengths), 2))
    assert refill["attrs"]["max_groups_in_flight"] == 2
    assert refill["attrs"]["generation_steps"] < fixed, (refill["attrs"], lengths)
    (spread,) = [e for e in entries if e["case"].get("spread")]
    assert spread["attrs"]["lane_splits"] > 0, spread["attrs"]
    # every rank on this one node's CPU: the other cases ran by turns (runtime.turns' default), one lane at a time
    for e in entries:
        turns = e["case"].get("extra", {}).get("runtime.turns", n > 1)
        assert bool(e["attrs"]["turns"]) == turns, (e["case"], e["attrs"])
        assert not turns or e["attrs"]["max_groups_in_flight"] == 1, (e["case"], e["attrs"])
    # sampling really samples: its tokens differ from greedy decoding of the same model and prompts
    greedy_llama = next(e for e in greedy if e["case"]["model"] == sampled[0]["case"]["model"])
    assert any(t != greedy_llama["tokens"][r][:len(t)] for r, t in sampled[0]["tokens"].items())


def test_smollm2_chat_template(smollm2_path, tmp_path):
    """SmolLM2-135M-Instruct with its chat template across 3 ranks equals transformers generate; the
    instruct model ends some replies with EOS."""
    rows = tmp_path / "prompts.jsonl"
    prompts = ["What is the capital of France?", "Say hello.", "List three colors.",
               "Write one sentence about the sea and the wind and the old boats in the harbour."]
    rows.write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
    case = {"model": str(smollm2_path), "k": 2, "head": "owner", "data": str(rows), "batch_size": 4,
            "max_new_tokens": 24, "max_length": 128, "extra": {"data.chat_template": "true"}}
    entries = _run(3, [case], tmp_path)
    _check(entries, 3)
    (e,) = entries
    assert all(text.strip() for text in e["generated_text"])


def test_stop_strings_and_schema(tiny_models, texts_file, tmp_path):
    """A stop string ends a row with finish_reason=stop and the text cut before it; the schema's dtypes."""
    case = {"model": str(tiny_models["llama"]), "k": 1, "head": "owner", "data": str(texts_file),
            "max_new_tokens": 12}
    first = _run(2, [case], tmp_path)[0]
    # stop at a piece of text that some row generates (its third token's text)
    text = first["generated_text"][1]
    stop = text.split()[2] if len(text.split()) > 2 else text[:3]
    case2 = dict(case, extra={"task.stop": json.dumps([stop])})
    second = _run(2, [case2], tmp_path)[0]
    assert second["error"] is None, second["error"]
    stopped = [i for i, r in enumerate(second["finish_reason"]) if r == "stop"]
    assert 1 in stopped
    for i in stopped:
        assert stop not in second["generated_text"][i]
        assert second["n_generated"][i] < 12
        tokens = second["tokens"][str(second["rows"][i])]
        assert tokens == first["tokens"][str(first["rows"][i])][:len(tokens)]  # same tokens up to the stop
    with h5py.File(tmp_path / "gen0.h5") as f:
        assert f["generated_ids"].dtype == h5py.vlen_dtype(np.int32)
        assert h5py.check_string_dtype(f["generated_text"].dtype) is not None
        assert h5py.check_string_dtype(f["finish_reason"].dtype) is not None
        for name in ("n_prompt_tokens", "n_generated", "n_releases"):
            assert f[name].dtype == np.int32, name
        assert json.loads(f.attrs["stop"]) == [stop]
        assert f.attrs["decoding"] == "greedy"


def test_pick_tokens_sampling_rules():
    """top_k=1 is greedy; top_p keeps the smallest set of tokens holding p of the mass; a row's draws
    depend only on (seed, row)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    gens = [row_generator(0, r) for r in range(3)]
    top1 = pick_tokens(logits, Decoding(4, temperature=1.0, top_k=1), gens)
    assert top1.tolist() == logits.argmax(-1).tolist()
    peaked = torch.full((1, 5), -10.0)
    peaked[0, 3] = 10.0  # one token holds ~all the mass: top_p=0.5 keeps only it
    draws = {pick_tokens(peaked, Decoding(4, temperature=5.0, top_p=0.5), [row_generator(1, i)]).item()
             for i in range(20)}
    assert draws == {3}
    a = pick_tokens(logits, Decoding(4, temperature=1.0), [row_generator(5, r) for r in range(3)])
    b = pick_tokens(logits[[2, 1, 0]], Decoding(4, temperature=1.0), [row_generator(5, r) for r in (2, 1, 0)])
    assert a.tolist() == b.flip(0).tolist()


@pytest.mark.parametrize(("overrides", "key"), [
    (["task.max_new_tokens=0"], "task.max_new_tokens"),
    (["task.max_new_tokens=many"], "task.max_new_tokens"),
    (["task.temperature=-1"], "task.temperature"),
    (["task.temperature=hot"], "task.temperature"),
    (["task.temperature=1", "task.top_k=-3"], "task.top_k"),
    (["task.temperature=1", "task.top_p=0"], "task.top_p"),
    (["task.temperature=1", "task.top_p=1.5"], "task.top_p"),
    (["task.top_k=5"], "task.top_k"),  # top-k only applies to sampling
    (["task.top_p=0.9"], "task.top_p"),
    (["task.seed=-1"], "task.seed"),
    (["task.stop=[1,2]"], "task.stop"),
    (["task.stop=['']"], "task.stop"),
    (["data.chat_template=sometimes"], "data.chat_template"),
])
def test_bad_generate_options_name_the_key(overrides, key):
    import re

    from hydra import compose, initialize_config_dir

    from nesa_hpc.config import ConfigError, settings_from_cfg

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="infer", overrides=["task=generate", *overrides])
    with pytest.raises(ConfigError, match=re.escape(key)):
        settings_from_cfg(cfg)


def test_generate_job_refuses_model_limits(tiny_models, texts_file, tmp_path):
    """Prompt length + new tokens beyond the model's positions, or a chat template the tokenizer lacks:
    every rank exits with an error naming the option, before any work."""
    base = [f"model.path={tiny_models['llama']}", "task=generate", f"data.path={texts_file}",
            f"output.path={tmp_path / 'out.h5'}", "runtime.threads=1"]
    # both jobs in one launch (tests/run_jobs.py: the config jobs/infer.py composes, run by the same function);
    # each ends every rank with the error that jobs/infer.py prints
    long, chat = run_jobs(2, [[*base, "data.max_length=200", "task.max_new_tokens=100"],
                              [*base, "data.max_length=64", "data.chat_template=true"]], tmp_path, timeout=300)
    assert long is not None
    assert "data.max_length=200 + task.max_new_tokens=100 exceeds the model's 256 positions" in long
    assert chat is not None
    assert "data.chat_template=true but the tokenizer" in chat
    assert not (tmp_path / "out.h5").exists()


def test_stop_then_resume_equals_uninterrupted(tiny_models, tmp_path):
    """SIGUSR1 mid-run, then output.resume=true: the file equals an uninterrupted sampling run row for row
    (each row's generator depends only on (seed, row), and a resumed run replays whole batching windows)."""
    import random
    import signal

    from test_resume import _committed, _finish, _start, _wait_for_progress

    from nesa_hpc.io.results import read_results

    rows = 160  # stopped after 30 rows, far from the end
    rng = random.Random(3)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(2, 30)))})
                            + "\n" for _ in range(rows)))

    def args(out):
        return [str(ROOT / "jobs" / "infer.py"), f"model.path={tiny_models['llama']}", "task=generate",
                f"data.path={data}", f"output.path={out}", "runtime.threads=1", "data.batch_size=4",
                "data.bucket_window=16", "data.max_length=64", "task.max_new_tokens=6", "task.temperature=0.9",
                "task.seed=11", "runtime.log_every=0.05"]

    ref = tmp_path / "ref.h5"
    assert run_mpi(3, args(ref)).returncode == 0
    out = tmp_path / "out.h5"
    proc = _start(args(out))
    _wait_for_progress(proc, 30)
    proc.send_signal(signal.SIGUSR1)
    code, stderr = _finish(proc)
    assert code == 75 and "stopped by SIGUSR1" in stderr, stderr[-2000:]
    committed = _committed(out)
    assert 0 < committed < rows
    resumed = run_mpi(3, [*args(out), "output.resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed after {committed} rows" in resumed.stderr
    got, attrs = read_results(out)
    want = read_results(ref)[0]
    assert attrs["complete"] and set(got) == set(want)
    for name, values in want.items():
        if name == "generated_ids":
            assert [v.tolist() for v in got[name]] == [v.tolist() for v in values]
        else:
            assert np.array_equal(got[name], values), name


def test_generation_with_noise_is_keyed_per_step_and_accounted(tiny_models, texts_file, tmp_path):
    """With privacy=gaussian every decode step is one keyed release: the generated tokens do not depend on
    the world size, and each row's epsilon_spent is the PLD composition of its n_releases."""
    from nesa_hpc.privacy.mechanism import Ledger

    outs = {}
    for n in (1, 3):
        out = tmp_path / f"noisy{n}.h5"
        proc = run_mpi(n, [str(ROOT / "jobs" / "infer.py"), f"model.path={tiny_models['llama']}", "task=generate",
                           f"data.path={texts_file}", "split.k=1", "task.max_new_tokens=6", "privacy=gaussian",
                           "privacy.epsilon=2000", "privacy.clip=20.0", "privacy.seed=4", f"output.path={out}",
                           "data.max_length=64",
                           "runtime.threads=1"], timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with h5py.File(out) as f:
            outs[n] = ({k: f[k][()] for k in ("generated_ids", "n_generated", "n_releases", "epsilon_spent")},
                       dict(f.attrs))
    (one, attrs), (three, _) = outs[1], outs[3]
    assert [list(t) for t in one["generated_ids"]] == [list(t) for t in three["generated_ids"]]
    assert np.array_equal(one["n_releases"], one["n_generated"])
    sigma, clip = attrs["privacy_sigma"], attrs["privacy_clip"]
    ledger = Ledger("gaussian", 1e-5, sigma / (2 * clip), None)
    np.testing.assert_allclose(three["epsilon_spent"], [ledger.epsilon(int(r)) for r in three["n_releases"]])
    assert attrs["privacy_epsilon_spent"] == pytest.approx(float(three["epsilon_spent"].max()))
    assert attrs["privacy_releases"] == int(one["n_releases"].max()) == 6
    # at k=0 a decode step sends only the embedding of a token picked from the workers' outputs: it gets
    # fresh noise but costs the row nothing, so every row spent exactly one release (its prompt)
    out = tmp_path / "noisy-k0.h5"
    proc = run_mpi(2, [str(ROOT / "jobs" / "infer.py"), f"model.path={tiny_models['llama']}", "task=generate",
                       f"data.path={texts_file}", "split.k=0", "task.max_new_tokens=6", "privacy=gaussian",
                       "privacy.unit=token", "privacy.epsilon=2000", "privacy.clip=20.0", "privacy.seed=4",
                       f"output.path={out}", "data.max_length=64", "runtime.threads=1"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with h5py.File(out) as f:
        k0, k0_attrs = {k: f[k][()] for k in ("n_generated", "n_releases", "epsilon_spent")}, dict(f.attrs)
    assert np.array_equal(k0["n_releases"], k0["n_generated"]) and k0["n_releases"].max() > 1
    ledger = Ledger("gaussian", 1e-5, k0_attrs["privacy_sigma"] / (2 * k0_attrs["privacy_clip"]), None)
    np.testing.assert_allclose(k0["epsilon_spent"], ledger.epsilon(1))
    assert k0_attrs["privacy_releases"] == 1


def test_every_family_generates_like_transformers(family_models, texts_file, tmp_path):
    """Greedy generation of every decoder family at 3 ranks is token-identical to transformers ``generate``
    on each prompt alone: KV caches split across ranks keep sliding windows and per-layer types right."""
    from families import DECODERS

    # the two splits in turn along the families: each family's KV cache split across ranks once
    splits = ((1, "owner"), (0, "last"))
    cases = [{"model": str(family_models[f]), "k": splits[i % 2][0], "head": splits[i % 2][1],
              "data": str(texts_file), "family": f} for i, f in enumerate(DECODERS)]
    entries = _run(3, cases, tmp_path)
    _check(entries, 3)
    assert {e["case"]["family"] for e in entries} == set(DECODERS)


def test_gemma3_greedy_equals_transformers(gemma3_path, tmp_path):
    """Gemma 3 270M across 3 ranks generates what transformers ``generate`` does on each prompt alone."""
    rows = tmp_path / "prompts.jsonl"
    prompts = ["The capital of France is", "Once upon a time", "def add(a, b):"]
    rows.write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
    case = {"model": str(gemma3_path), "k": 3, "head": "owner", "data": str(rows), "batch_size": 3,
            "max_new_tokens": 12, "max_length": 64}
    entries = _run(3, [case], tmp_path)
    _check(entries, 3)
    assert "the capital of" in entries[0]["generated_text"][0]


def test_trace_records_where_each_rank_spends_its_time(tiny_models, texts_file, tmp_path):
    """``runtime.trace``: rank 0 writes one timeline of both ranks (strict JSON, Chrome trace events); each rank's
    compute and wait spans add up to the figures of its ``rank_stats`` and never overlap."""
    trace_file, out = tmp_path / "trace.json", tmp_path / "out.h5"
    job = [f"model.path={tiny_models['llama']}", "task=generate", f"data.path={texts_file}", f"output.path={out}",
           "runtime.threads=1", "data.batch_size=2", "data.max_length=64", "task.max_new_tokens=6",
           f"runtime.trace={trace_file}"]
    assert run_jobs(2, [job], tmp_path, timeout=300) == [None]
    events = json.loads(trace_file.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the trace"))
    spans = [e for e in events["traceEvents"] if e["ph"] == "X"]
    names = {e["pid"]: e["args"]["name"] for e in events["traceEvents"] if e["name"] == "process_name"}
    assert sorted(names) == [0, 1] and names[0].startswith("rank 0 (")
    with h5py.File(out) as f:
        stats = {s["rank"]: s for s in json.loads(f.attrs["rank_stats"])}
    for rank in (0, 1):
        mine = sorted((e for e in spans if e["pid"] == rank), key=lambda e: e["ts"])
        for cat, key in (("compute", "compute_s"), ("wait", None)):
            total = sum(e["dur"] for e in mine if e["cat"] == cat) / 1e6
            expected = stats[rank][key] if key else stats[rank]["wait_input_s"] + stats[rank]["wait_send_s"]
            assert total == pytest.approx(expected, abs=2e-3 + 1e-3 * expected), (rank, cat)
        # one thread's spans follow each other
        assert all(a["ts"] + a["dur"] <= b["ts"] + 1 for a, b in zip(mine, mine[1:], strict=False)), rank
    assert {e["name"] for e in spans if e["pid"] == 0} >= {"lane 0: front", "lane 0: head, pick", "wait for input"}
    assert any(e["name"].startswith("GenerationStep ") for e in spans if e["pid"] == 1)


def test_hide_finish_keeps_rows_stepping_to_their_max_tokens(tiny_models, texts_file, tmp_path):
    """``task.hide_finish``: rows that EOS or a stop string ends early keep stepping until ``max_new_tokens``
    (the workers see every row leave at its max tokens); the file holds the same tokens, texts and finish
    reasons as without it, and each row's releases (and ε) count the extra steps."""
    new = 10
    outs = {hide: tmp_path / f"hide_{hide}.h5" for hide in (False, True)}
    jobs = [[f"model.path={tiny_models['llama']}", "task=generate", f"data.path={texts_file}", f"output.path={out}",
             "runtime.threads=1", "data.batch_size=3", "data.max_length=64", f"task.max_new_tokens={new}",
             "task.stop=[e,a]", "split.k=1", "privacy=gaussian", "privacy.epsilon=1000", "privacy.seed=5",
             f"task.hide_finish={str(hide).lower()}"] for hide, out in outs.items()]
    assert run_jobs(2, jobs, tmp_path, timeout=300) == [None, None]
    files = {hide: h5py.File(out) for hide, out in outs.items()}
    shown, hidden = files[False], files[True]
    for key in ("generated_ids", "generated_text", "finish_reason", "n_generated"):
        assert [np.asarray(v).tolist() for v in shown[key][()]] == [np.asarray(v).tolist() for v in hidden[key][()]]
    n = shown["n_generated"][()]
    early = n < new
    assert early.any() and (shown["finish_reason"][()][early] != b"length").all()
    np.testing.assert_array_equal(hidden["n_releases"][()], shown["n_releases"][()] + (new - n))
    assert (hidden["epsilon_spent"][()][early] > shown["epsilon_spent"][()][early]).all()
    assert hidden.attrs["generated_this_run"] == shown.attrs["generated_this_run"] == n.sum()


def test_pick_tokens_groups_rows_that_pick_alike():
    """Rows of an OpenAI batch file each have their own settings; those that pick alike (greedy whatever their
    max tokens or stops; sampling with equal temperature, top-k and top-p) pick as one batch, and every row
    gets the token it would get alone with its own generator."""
    torch.manual_seed(1)
    logits = torch.randn(5, 40)
    decodings = [Decoding(4), Decoding(9, stop=("x",)), Decoding(4, temperature=0.7, seed=3),
                 Decoding(7, temperature=0.7, seed=3), Decoding(4, temperature=1.5, top_k=5, seed=3)]
    assert len({d.pick_key for d in decodings}) == 3
    gens = [None if d.greedy else row_generator(3, r) for r, d in enumerate(decodings)]
    together = pick_tokens(logits, decodings, gens).tolist()
    alone = [pick_tokens(logits[r:r + 1], d, [None if d.greedy else row_generator(3, r)]).item()
             for r, d in enumerate(decodings)]
    assert together == alone
    assert together[:2] == logits[:2].argmax(-1).tolist()
    # all greedy: one argmax over the batch
    assert pick_tokens(logits, [Decoding(n) for n in range(1, 6)], [None] * 5).tolist() == logits.argmax(-1).tolist()


def test_finite_vectors_checks_sums_first_and_elements_where_a_sum_is_not_finite():
    from nesa_hpc.engine.stage import finite_vectors

    x = torch.ones(4, 3, 6)
    x[0, 1, 2] = float("nan")
    x[2, 0, 0] = float("inf")
    x[2, 0, 1] = float("-inf")  # inf + -inf: a NaN sum
    x[3, 2] = 3e38  # finite values whose sum overflows: still finite
    ok = finite_vectors(x)
    expected = torch.isfinite(x).all(-1)
    assert ok.tolist() == expected.tolist()
    assert ok[3, 2] and not ok[0, 1] and not ok[2, 0]
