"""The inputs and outputs batch users already have: per-token log-probabilities, continuation scoring, chat
rows, OpenAI batch files in and out (jobs/export.py). Every number is checked against plain transformers."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import strict_json
import torch
from conftest import ROOT, run_mpi

from nesa_hpc.io.tokenize import _appended_special_tokens

RUN_JOBS = ROOT / "tests" / "run_jobs.py"
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world", "a somewhat longer row of plain words",
         "numbers 1 2 3 4 5 6 7 8 9 10", "x"]


def _run_jobs(n: int, jobs: list[list[str]], tmp_path, name: str) -> list:
    spec, report = tmp_path / f"{name}.json", tmp_path / f"{name}-report.json"
    spec.write_text(json.dumps(jobs))
    proc = run_mpi(n, ["-m", "mpi4py", str(RUN_JOBS), str(spec), str(report)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(report.read_text())


def _read(path):
    with h5py.File(path) as f:
        assert f.attrs["complete"]
        return {k: f[k][()] for k in f}, dict(f.attrs)


@pytest.fixture(scope="module")
def chat_model(tiny_models, tmp_path_factory):
    """The tiny Llama with a chat template added to its tokenizer."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat") / "llama"
    shutil.copytree(tiny_models["llama"], folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return folder


def _greedy(model, ids: list[int], n: int, eos: list[int] | None = None) -> list[int]:
    """``generate`` greedy: up to ``n`` tokens ending at ``eos``, or exactly ``n`` (no EOS) without it."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                             min_new_tokens=0 if eos else n, eos_token_id=eos, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _pairs(tok, model) -> list[dict]:
    """Prompt/completion rows: completions that are the model's greedy continuation (where the text
    re-tokenizes to the same tokens), others that are not, and a chat prompt."""
    rows = []
    after = _appended_special_tokens(tok)
    for prompt in ["the quick brown", "hello", "numbers 1 2 3", "a somewhat longer row of", "one two three four"]:
        ids = tok(prompt)["input_ids"][:len(tok(prompt)["input_ids"]) - after]
        cont = _greedy(model, ids, 3)
        text = " " + tok.decode(cont)
        rows.append({"prompt": prompt, "completion": text})
        rows.append({"prompt": prompt + " ", "completion": "world of words"})  # trailing space moves over
    rows.append({"prompt": [{"role": "user", "content": "say something"}], "completion": "something nice"})
    rows.append({"prompt": "", "completion": "no text before"})  # the tokenizer's [CLS] is the only context
    rows.append({"prompt": "nothing follows", "completion": ""})  # refused: no token to score
    return rows


def _pair_reference(tok, model, prompt: str, completion: str):
    """Log-probs of the completion's tokens and whether greedy generation reproduces them, by hand."""
    after = _appended_special_tokens(tok)
    spaces = len(prompt) - len(prompt.rstrip())
    if spaces:
        prompt, completion = prompt[:-spaces], prompt[-spaces:] + completion
    whole = tok(prompt + completion)["input_ids"]
    whole = whole[:len(whole) - after]
    ctx = len(tok(prompt)["input_ids"]) - after
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    targets = torch.tensor(whole[ctx:])
    lp = logp[ctx - 1:-1].gather(1, targets.unsqueeze(1)).squeeze(1)
    greedy = _greedy(model, whole[:ctx], len(whole) - ctx) == whole[ctx:]
    return lp.numpy(), greedy, ctx


def test_token_logprobs_continuations_chats_and_openai_round_trip(tiny_models, chat_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model)
    model = AutoModelForCausalLM.from_pretrained(chat_model, dtype=torch.float32).eval()
    # inputs
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    pairs_rows = _pairs(tok, model)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in pairs_rows))
    chats_rows = [{"messages": [{"role": "user", "content": "hello there"}]}, {"text": "plain text row"},
                  {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello"}]}]
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps(r) + "\n" for r in chats_rows))
    requests = [
        {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "tell me a story"}],
                  "max_tokens": 6}},
        {"custom_id": "b", "method": "POST", "url": "/v1/completions",
         "body": {"model": "m", "prompt": "once upon a time", "max_tokens": 4, "temperature": 0.9, "top_p": 0.8,
                  "seed": 11}},
        {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "tools": []}},
        {"custom_id": "d", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": ["the end"], "max_completion_tokens": 5, "temperature": 1.3, "seed": 2, "n": 1}},
        {"custom_id": "e", "method": "POST", "url": "/v1/completions", "body": {"prompt": "the end", "stop": "e"}},
    ]
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps(r) + "\n" for r in requests))
    chat_lp = {"method": "POST", "url": "/v1/chat/completions"}
    lp_requests = [
        {"custom_id": "c2", **chat_lp, "body": {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                                              "top_logprobs": 2, "max_tokens": 4}},
        {"custom_id": "p1", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "once upon", "logprobs": 1, "max_tokens": 4}},
        {"custom_id": "none", "method": "POST", "url": "/v1/completions", "body": {"prompt": "the end"}},
        {"custom_id": "many", **chat_lp, "body": {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                                                "top_logprobs": 5}},
        # lm-eval's OpenAI completions backend scores a continuation so: echo, logprobs, one token
        {"custom_id": "echo", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "the quick brown fox jumps", "echo": True, "logprobs": 2, "max_tokens": 1}},
        {"custom_id": "echo-text", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "hello there", "echo": True, "max_tokens": 2}},
    ]
    lp_batch = tmp_path / "lp_batch.jsonl"
    lp_batch.write_text("".join(json.dumps(r) + "\n" for r in lp_requests))
    emb = {"method": "POST", "url": "/v1/embeddings"}
    emb_requests = [
        {"custom_id": "e1", **emb, "body": {"model": "text-embedding-3-small", "input": "hello world"}},
        {"custom_id": "e2", **emb, "body": {"input": ["one input in a list"], "encoding_format": "float"}},
        {"custom_id": "e3", **emb, "body": {"input": ["two", "inputs"]}},
        {"custom_id": "e4", **emb, "body": {"input": "x", "encoding_format": "base64"}},
        {"custom_id": "e5", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "hi"}]}},
    ]
    emb_batch = tmp_path / "emb_batch.jsonl"
    emb_batch.write_text("".join(json.dumps(r) + "\n" for r in emb_requests))
    ids_rows = [{"uid": "a-1", "text": "first row"}, {"uid": 7, "text": "the second row"}, {"text": "no id here"},
                {"uid": "z", "messages": [{"role": "user", "content": "hi"}]}]
    with_ids = tmp_path / "ids.jsonl"
    with_ids.write_text("".join(json.dumps(r) + "\n" for r in ids_rows))
    ids_csv = tmp_path / "ids.csv"
    ids_csv.write_text("text,uid\nfirst row,a-1\nthe second row,7\n")

    def job(out, *extra, data=texts):
        return [f"model.path={chat_model}", f"data.path={data}", f"output.path={tmp_path / out}",
                "output.overwrite=true", "runtime.threads=1", "data.max_length=48", "data.batch_size=2", *extra]

    score = ["task=score", "task.token_logprobs=true", "task.top_logprobs=3"]
    jobs3 = [
        job("lp-owner.h5", *score, "split.k=1", "split.head=owner"),
        job("lp-last.h5", *score, "split.k=2", "split.head=last", "data.padding_side=left"),
        job("pairs.h5", "task=score", "task.token_logprobs=true", "split.k=2", "data.prompt_field=prompt",
            "data.completion_field=completion", "data.on_error=skip", data=pairs),
        job("chats-score.h5", "task=score", "split.k=1", data=chats),
        job("chats-gen.h5", "task=generate", "task.max_new_tokens=5", "split.k=1", data=chats),
        job("batch3.h5", "task=generate", "data.format=openai_batch", "data.on_error=skip", "split.k=1",
            "task.max_new_tokens=3", data=batch),
        job("ids.h5", "task=score", "split.k=1", "data.id_field=uid", "data.on_error=skip", data=with_ids),
        job("emb-batch.h5", "task=embed", "data.format=openai_batch", "split.k=1", data=emb_batch),
        job("chats-lp.h5", "task=generate", "task.max_new_tokens=5", "split.k=1", "task.top_logprobs=2", data=chats),
        job("batch-lp.h5", "task=generate", "data.format=openai_batch", "split.k=2", "task.logprobs=true",
            "task.top_logprobs=2", "task.max_new_tokens=3", data=lp_batch),
        job("batch-lp-chunks.h5", "task=generate", "data.format=openai_batch", "split.k=0", "task.logprobs=true",
            "task.top_logprobs=2", "task.max_new_tokens=3", "runtime.prefill_tokens=2", data=lp_batch),
        job("ids-csv.h5", "task=score", "split.k=1", "data.id_field=uid", data=ids_csv),
    ]
    assert _run_jobs(3, jobs3, tmp_path, "n3") == [None] * len(jobs3)
    jobs1 = [job("batch1.h5", "task=generate", "data.format=openai_batch", "data.on_error=skip", "split.k=0",
                 "task.max_new_tokens=3", data=batch)]
    assert _run_jobs(1, jobs1, tmp_path, "n1") == [None]

    # --- per-token log-probabilities and top-N against the model's log-softmax, both head placements
    for name in ("lp-owner.h5", "lp-last.h5"):
        res, attrs = _read(tmp_path / name)
        assert res["token_logprobs"].dtype == object and h5py.check_vlen_dtype(
            h5py.File(tmp_path / name)["top_logprob_ids"].dtype) == np.int32
        for i, r in enumerate(res["row"]):
            ids = tok(TEXTS[r], truncation=True, max_length=48)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)[:-1]
            ref = logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).numpy()
            got = res["token_logprobs"][i]
            assert got.dtype == np.float32 and len(got) == res["n_tokens"][i] == len(ids) - 1
            np.testing.assert_allclose(got, ref, atol=1e-4)
            assert abs(-got.astype(np.float64).sum() - res["nll_sum"][i]) < 1e-3
            vals, top = logp.topk(3, -1)
            np.testing.assert_array_equal(res["top_logprob_ids"][i].reshape(-1, 3), top.numpy())
            np.testing.assert_allclose(res["top_logprobs"][i].reshape(-1, 3), vals.numpy(), atol=1e-4)

    # --- continuation scoring: completion tokens only, is_greedy as generate says
    res, attrs = _read(tmp_path / "pairs.h5")
    assert json.loads(attrs["resume_key"])["completion_field"] == "completion"
    rendered = []
    for row in pairs_rows:
        prompt = row["prompt"]
        if isinstance(prompt, list):
            prompt = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        rendered.append((prompt, row["completion"]))
    assert res["skipped_row"].tolist() == [len(pairs_rows) - 1]
    assert b"the completion has no tokens" in res["skipped_reason"][0]
    greedy_seen = set()
    for i, r in enumerate(res["row"]):
        lp, greedy, ctx = _pair_reference(tok, model, *rendered[r])
        assert res["n_tokens"][i] == len(lp) and res["n_prompt_tokens"][i] == ctx, r
        np.testing.assert_allclose(res["token_logprobs"][i], lp, atol=1e-4)
        assert abs(res["nll_sum"][i] + lp.astype(np.float64).sum()) < 1e-3
        assert abs(res["nll_mean"][i] - res["nll_sum"][i] / len(lp)) < 1e-12
        assert bool(res["is_greedy"][i]) == greedy, r
        greedy_seen.add(greedy)
    assert greedy_seen == {True, False}  # both outcomes are exercised

    # --- chat rows: scored and generated through the chat template
    res, _ = _read(tmp_path / "chats-score.h5")
    for i, r in enumerate(res["row"]):
        row = chats_rows[r]
        text = row.get("text") or tok.apply_chat_template(row["messages"], tokenize=False)
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            ref = torch.nn.functional.cross_entropy(model(torch.tensor([ids])).logits[0, :-1].float(),
                                                    torch.tensor(ids[1:]), reduction="sum").item()
        assert res["n_tokens"][i] == len(ids) - 1 and abs(res["nll_sum"][i] - ref) < 1e-3, r
    res, attrs = _read(tmp_path / "chats-gen.h5")
    eos = json.loads(attrs["eos_token_ids"]) if isinstance(attrs["eos_token_ids"], str) else \
        list(attrs["eos_token_ids"])
    for i, r in enumerate(res["row"]):
        row = chats_rows[r]
        text = row.get("text") or tok.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
        ids = tok(text)["input_ids"]
        assert res["n_prompt_tokens"][i] == len(ids)
        assert res["generated_ids"][i].tolist() == _greedy(model, ids, 5, eos), r

    # --- generated tokens' log-probabilities: the model's log-softmax at each step, the top-2 most likely first
    lp, lp_attrs = _read(tmp_path / "chats-lp.h5")
    assert lp_attrs["token_logprobs"] == True and lp_attrs["top_logprobs"] == 2  # noqa: E712
    for i, r in enumerate(lp["row"]):
        row = chats_rows[r]
        text = row.get("text") or tok.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
        ids, gen = tok(text)["input_ids"], lp["generated_ids"][i].tolist()
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids + gen])).logits[0, len(ids) - 1:-1].float(), -1)
        want = logp[torch.arange(len(gen)), torch.tensor(gen)]
        np.testing.assert_allclose(lp["generated_logprobs"][i], want.numpy(), atol=1e-4)
        top_ids = lp["generated_top_logprob_ids"][i].reshape(-1, 2)
        assert top_ids[:, 0].tolist() == gen  # greedy: the picked token is the most likely
        np.testing.assert_allclose(lp["generated_top_logprobs"][i].reshape(-1, 2), logp.topk(2).values, atol=1e-4)
    lines = {x["custom_id"]: x for x in
             strict_json.lines(_export(tmp_path / "batch-lp.h5", tmp_path / "batch-lp.jsonl").read_text())}
    blp, _ = _read(tmp_path / "batch-lp.h5")
    c2 = lines["c2"]["response"]["body"]["choices"][0]["logprobs"]
    assert len(c2["content"]) == int(blp["n_generated"][0]) and c2["refusal"] is None
    np.testing.assert_allclose([c["logprob"] for c in c2["content"]], blp["generated_logprobs"][0], atol=1e-6)
    assert all(len(c["top_logprobs"]) == 2 and c["bytes"] == list(c["token"].encode()) for c in c2["content"])
    p1 = lines["p1"]["response"]["body"]["choices"][0]["logprobs"]
    assert len(p1["tokens"]) == len(p1["token_logprobs"]) == len(p1["text_offset"]) == int(blp["n_generated"][1])
    assert all(len(alt) <= 1 for alt in p1["top_logprobs"]) and p1["text_offset"][0] == 0
    assert lines["none"]["response"]["body"]["choices"][0]["logprobs"] is None
    assert lines["many"]["response"]["status_code"] == 400
    assert "task.top_logprobs=5" in lines["many"]["response"]["body"]["error"]["message"]
    # echo: the prompt's tokens and log-probabilities (the first null) before the generated ones
    at = {c.decode(): i for i, c in enumerate(blp["custom_id"])}
    prompt_ids = tok("the quick brown fox jumps")["input_ids"]
    e = at["echo"]
    assert blp["prompt_ids"][e].tolist() == prompt_ids and blp["echo_prompt"][e] == b"the quick brown fox jumps"
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt_ids])).logits[0].float(), -1)[:-1]
    np.testing.assert_allclose(blp["prompt_logprobs"][e], logp.gather(1, torch.tensor(prompt_ids[1:]).unsqueeze(1))
                               .squeeze(1).numpy(), atol=1e-4)
    np.testing.assert_allclose(blp["prompt_top_logprobs"][e].reshape(-1, 2), logp.topk(2).values.numpy(), atol=1e-4)
    echo = lines["echo"]["response"]["body"]["choices"][0]
    assert echo["text"] == "the quick brown fox jumps" + blp["generated_text"][e].decode()
    lp = echo["logprobs"]
    n_prompt = len(prompt_ids)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n_prompt + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["tokens"][:n_prompt] == [tok.decode([t]) for t in prompt_ids]
    # what lm-eval reads of it: the continuation's log-probabilities (context: the first token) and is_greedy
    np.testing.assert_allclose(lp["token_logprobs"][1:-1], blp["prompt_logprobs"][e], atol=1e-6)
    assert all(len(t) == 2 for t in lp["top_logprobs"][1:])
    plain = lines["echo-text"]["response"]["body"]["choices"][0]
    assert plain["text"] == "hello there" + blp["generated_text"][at["echo-text"]].decode()
    assert plain["logprobs"] is None and len(blp["prompt_logprobs"][at["echo-text"]]) == 0
    chunks, _ = _read(tmp_path / "batch-lp-chunks.h5")  # the prompt in chunks of 2 tokens, every layer on workers
    np.testing.assert_allclose(chunks["prompt_logprobs"][e], blp["prompt_logprobs"][e], atol=1e-5)
    np.testing.assert_allclose(chunks["prompt_top_logprobs"][e], blp["prompt_top_logprobs"][e], atol=1e-5)

    # --- OpenAI batch: per-row settings, the same tokens at 1 and 3 ranks, greedy rows equal generate
    b3, a3 = _read(tmp_path / "batch3.h5")
    b1, _ = _read(tmp_path / "batch1.h5")
    assert [x.decode() for x in b3["custom_id"]] == ["a", "b", "d", "e"]
    assert b3["skipped_row"].tolist() == [2] and b"'tools'" in b3["skipped_reason"][0]
    for i in range(len(b3["row"])):
        assert b3["generated_ids"][i].tolist() == b1["generated_ids"][i].tolist(), i
    for i, most in enumerate([6, 4, 5, 3]):  # max_tokens / max_completion_tokens per row, else the job's 3
        reason = b3["finish_reason"][i]
        assert b3["n_generated"][i] == most if reason == b"length" else b3["n_generated"][i] <= most, i
    assert b"length" in b3["finish_reason"][:3].tolist()
    ids_a = tok(tok.apply_chat_template(requests[0]["body"]["messages"], tokenize=False,
                                        add_generation_prompt=True))["input_ids"]
    assert b3["generated_ids"][0].tolist() == _greedy(model, ids_a, 6, eos)
    assert b3["finish_reason"][3] in (b"stop", b"length", b"eos")
    if b3["finish_reason"][3] == b"stop":
        assert "e" not in b3["generated_text"][3].decode()

    # --- export: the OpenAI output file, in input order, one line per request, read by a parser written for
    # OpenAI's batch output files (every line has a response with a status code; errors in its body)
    out = tmp_path / "answers.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "export.py"), str(tmp_path / "batch3.h5"), "-o",
                           str(out), "--format", "openai_batch"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = strict_json.lines(out.read_text())
    assert [x["custom_id"] for x in lines] == ["a", "b", "c", "d", "e"]
    parsed = {x["custom_id"]: _openai_parser(x) for x in lines}
    assert parsed["c"][0] == 400 and "tools" in parsed["c"][1]
    for x, i in zip([lines[0], lines[1], lines[3], lines[4]], range(4), strict=True):
        body = x["response"]["body"]
        status, text = parsed[x["custom_id"]]
        assert status == 200 and x["error"] is None and text == b3["generated_text"][i].decode()
        assert body["object"] == ("chat.completion" if x["custom_id"] == "a" else "text_completion")
        assert body["model"] == {"a": "gpt-4o-mini", "b": "m"}.get(x["custom_id"], chat_model.name)
        usage = body["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == \
            (int(b3["n_prompt_tokens"][i]), int(b3["n_generated"][i]),
             int(b3["n_prompt_tokens"][i] + b3["n_generated"][i]))
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0
        assert usage["completion_tokens_details"]["reasoning_tokens"] == 0
        assert body["system_fingerprint"].startswith("fp_")
        reason = b3["finish_reason"][i].decode()
        assert body["choices"][0]["finish_reason"] == ("length" if reason == "length" else "stop")
    # ids: OpenAI's prefixes, unique within the file, the same at the next export, other in another file
    for key in ("id", "request_id", "body_id"):
        got = [x["id"] if key == "id" else x["response"]["request_id"] if key == "request_id" else
               x["response"]["body"].get("id", "") for x in lines]
        assert len(set(got)) == len(got) or key == "body_id", (key, got)
    assert all(x["id"].startswith("batch_req_") and x["response"]["request_id"].startswith("req_") for x in lines)
    again = tmp_path / "again.jsonl"
    subprocess.run([sys.executable, str(ROOT / "jobs" / "export.py"), str(tmp_path / "batch3.h5"), "-o",
                    str(again), "--format", "openai_batch"], check=True, capture_output=True, timeout=120)
    assert again.read_text() == out.read_text()
    b1_lines = strict_json.lines(_export(tmp_path / "batch1.h5", tmp_path / "b1.jsonl").read_text())
    assert not {x["id"] for x in b1_lines} & {x["id"] for x in lines}  # two batches' lines join without clashes
    # --errors: OpenAI's two files, answered requests in one and refused ones in the other
    ok, bad = tmp_path / "ok.jsonl", tmp_path / "bad.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "export.py"), str(tmp_path / "batch3.h5"), "-o",
                           str(ok), "--errors", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "1 error lines" in proc.stdout, proc.stderr
    assert strict_json.lines(ok.read_text()) == [x for x in lines if x["custom_id"] != "c"]
    assert strict_json.lines(bad.read_text()) == [lines[2]]

    # --- /v1/embeddings requests (task=embed): answered in OpenAI's embeddings shape, the refused ones on their line
    eb, _ = _read(tmp_path / "emb-batch.h5")
    assert [x.decode() for x in eb["custom_id"]] == ["e1", "e2"] and eb["skipped_row"].tolist() == [2, 3, 4]
    lines = strict_json.lines(_export(tmp_path / "emb-batch.h5", tmp_path / "emb-out.jsonl").read_text())
    assert [x["custom_id"] for x in lines] == ["e1", "e2", "e3", "e4", "e5"]
    for x, i in ((lines[0], 0), (lines[1], 1)):
        body = x["response"]["body"]
        assert x["response"]["status_code"] == 200 and body["object"] == "list"
        assert body["data"][0]["object"] == "embedding" and body["data"][0]["index"] == 0
        np.testing.assert_allclose(body["data"][0]["embedding"], eb["embedding"][i], rtol=1e-6)
        assert body["usage"] == {"prompt_tokens": int(eb["n_tokens"][i]), "total_tokens": int(eb["n_tokens"][i])}
    assert lines[0]["response"]["body"]["model"] == "text-embedding-3-small"
    assert lines[1]["response"]["body"]["model"] == chat_model.name
    why = [x["response"]["body"]["error"]["message"] for x in lines[2:]]
    assert all(x["response"]["status_code"] == 400 for x in lines[2:])
    assert "2 inputs" in why[0] and "encoding_format='base64'" in why[1] and "needs task=generate" in why[2]

    # --- data.id_field: each row's id kept beside its row (JSONL, CSV), in every export; a row without one
    # is a bad row
    res, attrs = _read(tmp_path / "ids.h5")
    assert res["row"].tolist() == [0, 1, 3] and [x.decode() for x in res["id"]] == ["a-1", "7", "z"]
    assert res["skipped_row"].tolist() == [2] and b"'uid' (data.id_field)" in res["skipped_reason"][0]
    assert attrs["id_field"] == "uid"
    res_csv, _ = _read(tmp_path / "ids-csv.h5")
    assert [x.decode() for x in res_csv["id"]] == ["a-1", "7"]
    np.testing.assert_allclose(res_csv["nll_sum"], res["nll_sum"][:2], rtol=1e-6)  # the id changes no score
    table = strict_json.lines(_export_table(tmp_path / "ids.h5", tmp_path / "ids-table.jsonl").read_text())
    assert [(t["row"], t["id"]) for t in table] == [(0, "a-1"), (1, "7"), (3, "z")]

    # --- export: tables equal the HDF5 datasets, in every format
    res, _ = _read(tmp_path / "lp-owner.h5")
    for suffix in ("jsonl", "csv", "parquet"):
        path = tmp_path / f"table.{suffix}"
        proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "export.py"), str(tmp_path / "lp-owner.h5"),
                               "-o", str(path)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        if suffix == "jsonl":
            table = strict_json.lines(path.read_text())
        elif suffix == "csv":
            table = list(csv.DictReader(path.open()))
            for t in table:
                t.update(row=int(t["row"]), nll_sum=float(t["nll_sum"]),
                         token_logprobs=json.loads(t["token_logprobs"]))
        else:
            table = pq.read_table(path).to_pylist()
        assert [t["row"] for t in table] == res["row"].tolist()
        for t, i in zip(table, range(len(table)), strict=True):
            assert t["nll_sum"] == pytest.approx(res["nll_sum"][i], rel=1e-12)
            np.testing.assert_allclose(t["token_logprobs"], res["token_logprobs"][i], rtol=1e-6)
    # a second export to the same file is refused, and an incomplete file is refused
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "export.py"), str(tmp_path / "lp-owner.h5"), "-o",
                           str(tmp_path / "table.csv")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "already exists" in proc.stderr


@pytest.mark.parametrize("overrides, key", [
    (["data.prompt_field=p"], "data.prompt_field and data.completion_field"),
    (["data.prompt_field=p", "data.completion_field=c", "task=generate"], "data.completion_field"),
    (["data.format=openai_batch"], "data.format=openai_batch"),
    (["task.top_logprobs=-1"], "task.top_logprobs"),
    (["+task.token_logprobs=yes"], "task.token_logprobs"),
])
def test_row_and_logprob_options_name_the_key(overrides, key):
    from hydra import compose, initialize_config_dir

    from nesa_hpc.config import ConfigError, settings_from_cfg

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="infer", overrides=[o.lstrip("+") if "token_logprobs" in o else o
                                                      for o in overrides])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        settings_from_cfg(cfg)


def test_openai_request_lines_are_checked_row_by_row():
    from nesa_hpc.io.inputs import RowFields

    fields = RowFields(openai=True, max_new_tokens=100)
    ok = {"custom_id": "x", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "h"}]}}
    assert fields.extract(ok, "f:1").custom_id == "x"
    bad = [
        ({"url": "/v1/completions", "body": {"prompt": "p"}}, "custom_id"),
        ({**ok, "url": "/v1/embeddings"}, "url /v1/embeddings needs task=embed"),
        ({**ok, "url": "/v1/files"}, "url '/v1/files' is not supported"),
        ({**ok, "body": {**ok["body"], "n": 2}}, "n=2 is not supported"),
        ({**ok, "body": {**ok["body"], "max_tokens": 1000}}, "exceeds the model's positions"),
        ({**ok, "body": {**ok["body"], "temperature": -1}}, "temperature=-1"),
        ({**ok, "body": {**ok["body"], "response_format": {}}}, "'response_format'"),
        ({**ok, "body": {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}}, "'image_url' part"),
        ({**ok, "body": {"messages": []}}, "non-empty list"),
        ({"custom_id": "y", "url": "/v1/completions", "body": {"prompt": ["a", "b"]}}, "must be a string"),
        ({"custom_id": "y", "url": "/v1/completions", "body": {"prompt": "a", "echo": "yes"}}, "echo='yes'"),
        ({**ok, "body": {**ok["body"], "echo": True}}, "echo=True is not supported"),  # not a chat option
    ]
    for obj, message in bad:
        with pytest.raises(ValueError, match=message):
            fields.extract(obj, "f:1")
    echo = {"custom_id": "e", "url": "/v1/completions", "body": {"prompt": "a b", "echo": True, "logprobs": 1}}
    assert RowFields(openai=True, logprobs=1).extract(echo, "f:1").echo
    with pytest.raises(ValueError, match="split.head=owner"):  # the prompt is scored where the head runs
        RowFields(openai=True, logprobs=1, prompt_logprobs=False).extract(echo, "f:1")


def test_encode_pair_is_the_harness_tokenization(smollm2_path):
    """SmolLM2's byte-level BPE adds no special tokens: the prompt's trailing space moves to the completion,
    a prompt with no tokens is refused, and a long row keeps its last tokens (the completion whole)."""
    from transformers import AutoTokenizer

    from nesa_hpc.io.tokenize import encode_pair

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    ids, n_prompt, cut = encode_pair(tok, "The capital of France is ", "Paris", 64)
    assert ids == tok("The capital of France is Paris")["input_ids"] and not cut
    assert ids[:n_prompt] == tok("The capital of France is")["input_ids"]
    assert tok.decode(ids[n_prompt:]) == " Paris"
    with pytest.raises(ValueError, match="the prompt has no tokens"):
        encode_pair(tok, "", "Paris", 64)
    long_prompt = "word " * 40 + "end"
    ids, n_prompt, cut = encode_pair(tok, long_prompt, " of the story", 16)
    whole = tok(long_prompt + " of the story")["input_ids"]
    assert cut and ids == whole[-16:] and tok.decode(ids[n_prompt:]) == " of the story"
    assert encode_pair(tok, "a", " b" * 40, 16) == ([], 40, True)  # the completion alone does not fit


def _results_file(path, epsilon: list[float]) -> None:
    """A complete results file of three rows: its privacy ledger and a per-row float with a NaN."""
    with h5py.File(path, "w") as f:
        f["row"] = np.arange(3)
        f["skipped_row"] = np.zeros(0, dtype=np.int64)
        f["skipped_reason"] = np.array([], dtype=h5py.string_dtype())
        f["epsilon_spent"] = np.array(epsilon)
        f["nll_sum"] = np.array([1.5, np.nan, 2.0])
        f.attrs["complete"] = True


def test_exports_keep_infinity_and_nan_apart_and_json_strict(tmp_path):
    """ε = ∞ (privacy off) and NaN are different values in every export format: strings "Infinity" and
    "NaN" in JSONL (strict JSON), inf and nan in CSV, floats in Parquet, whose column types do not depend on
    the values (a job with privacy and one without concatenate)."""
    import math

    import pyarrow as pa

    from nesa_hpc.io.export import export

    inf = float("inf")
    _results_file(tmp_path / "off.h5", [inf, inf, inf])
    _results_file(tmp_path / "on.h5", [1.0, 2.0, 3.0])
    export(tmp_path / "off.h5", tmp_path / "off.jsonl")
    lines = strict_json.lines((tmp_path / "off.jsonl").read_text())
    assert [x["epsilon_spent"] for x in lines] == ["Infinity"] * 3
    assert [x["nll_sum"] for x in lines] == [1.5, "NaN", 2.0]
    export(tmp_path / "off.h5", tmp_path / "off.csv")
    table = list(csv.DictReader((tmp_path / "off.csv").open()))
    assert all(float(t["epsilon_spent"]) == inf for t in table) and math.isnan(float(table[1]["nll_sum"]))
    for name in ("off", "on"):
        export(tmp_path / f"{name}.h5", tmp_path / f"{name}.parquet")
    off, on = pq.read_table(tmp_path / "off.parquet"), pq.read_table(tmp_path / "on.parquet")
    assert off.schema == on.schema and off.schema.field("epsilon_spent").type == pa.float64()
    both = pa.concat_tables([off, on]).to_pydict()
    assert both["epsilon_spent"] == [inf] * 3 + [1.0, 2.0, 3.0] and math.isnan(both["nll_sum"][1])


def test_json_we_write_is_strict():
    """Non-finite numbers become strings that a strict parser reads and that tell infinity from NaN."""
    from nesa_hpc.io import jsonfile

    value = {"a": float("inf"), "b": [float("-inf"), np.float32("nan"), np.float64(2.5)], "c": np.arange(2)}
    text = jsonfile.dumps(value)
    assert strict_json.loads(text) == {"a": "Infinity", "b": ["-Infinity", "NaN", 2.5], "c": [0, 1]}
    assert jsonfile.number("Infinity") == float("inf") and jsonfile.number(3) == 3.0
    with pytest.raises(ValueError):
        strict_json.loads(json.dumps(float("nan")))


def _openai_parser(line: dict) -> tuple[int, str]:
    """What a script written for OpenAI's batch output files reads from a line: the status code, then the
    completion's text, or the error's message."""
    response = line["response"]
    body = response["body"]
    if response["status_code"] != 200:
        return response["status_code"], body["error"]["message"]
    choice = body["choices"][0]
    return 200, choice["message"]["content"] if body["object"] == "chat.completion" else choice["text"]


def _export(results, out):
    from nesa_hpc.io.export import export

    export(results, out, "openai_batch")
    return out


def test_chat_text_parts_join_with_a_newline():
    from nesa_hpc.io.inputs import RowFields

    line = {"custom_id": "x", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"},
                                                                {"type": "text", "text": "world"}]}]}}
    assert RowFields(openai=True, max_new_tokens=8).extract(line, "f:1").messages[0]["content"] == "Hello\nworld"


def test_duplicate_custom_ids_are_refused(tmp_path):
    """A batch's requests need unique custom_ids: a repeated one is a bad row naming both lines (skipped by
    default for OpenAI batch files, so the first request still runs)."""
    from nesa_hpc.io.read import DataError, RowError, read_rows

    line = {"url": "/v1/completions", "body": {"prompt": "hi"}}
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps({"custom_id": c, **line}) + "\n" for c in ("a", "b", "a")))
    rows = list(read_rows(path, fmt="openai_batch", on_error="skip"))
    assert [r for r, _ in rows] == [0, 1, 2] and [v.custom_id for _, v in rows[:2]] == ["a", "b"]
    assert isinstance(rows[2][1], RowError) and "batch.jsonl:3: duplicate custom_id 'a' (first on line 1)" in \
        rows[2][1].reason
    with pytest.raises(DataError, match="duplicate custom_id"):
        list(read_rows(path, fmt="openai_batch", on_error="fail"))


def test_an_incomplete_leftover_is_named_as_such(tmp_path):
    """A run that failed on its first row leaves an incomplete file: the rerun's refusal says so."""
    from nesa_hpc.io.results import OutputExistsError, check_output_path

    _results_file(tmp_path / "done.h5", [1.0, 2.0, 3.0])
    with pytest.raises(OutputExistsError) as done:
        check_output_path(tmp_path / "done.h5", overwrite=False)
    assert "an incomplete results file" not in str(done.value)
    with h5py.File(tmp_path / "left.h5", "w") as f:
        f["row"] = np.zeros(0, dtype=np.int64)
        f.attrs["complete"] = False
    with pytest.raises(OutputExistsError, match=r"an incomplete results file: its run stopped or failed and "
                                                r"committed no row\); pass output.overwrite=true"):
        check_output_path(tmp_path / "left.h5", overwrite=False)


def test_parquet_keeps_the_results_files_attributes(tmp_path):
    """An exported Parquet table carries the results file's attributes (its provenance: model, task,
    settings, ledger, widths) as JSON in the schema's metadata; an empty table keeps the datasets' types."""
    from nesa_hpc.io.export import export

    _results_file(tmp_path / "r.h5", [1.0, 2.0, 3.0])
    with h5py.File(tmp_path / "r.h5", "a") as f:
        f.attrs.update(model_path="/models/smollm2", top_logprobs=3, rank_stats=json.dumps([{"rank": 0}]),
                       privacy_epsilon_spent=float("inf"))
    export(tmp_path / "r.h5", tmp_path / "r.parquet")
    table = pq.read_table(tmp_path / "r.parquet")
    attrs = strict_json.loads(table.schema.metadata[b"nesa_hpc.attrs"])
    assert attrs["model_path"] == "/models/smollm2" and attrs["top_logprobs"] == 3 and attrs["complete"] is True
    assert attrs["rank_stats"] == [{"rank": 0}] and attrs["privacy_epsilon_spent"] == "Infinity"
    assert table.num_rows == 3


def _export_table(results, out):
    from nesa_hpc.io.export import export

    export(results, out)
    return out
