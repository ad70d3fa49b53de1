"""task.convention=lm_eval: rows tokenized and scored as lm-evaluation-harness's HF model does.

The rules are written out again here, from the harness's code (``lm_eval/api/model.py`` ``loglikelihood`` and
``_encode_pair``, ``lm_eval/models/huggingface.py`` ``tok_encode`` / ``prefix_token_id`` /
``loglikelihood_rolling``, ``lm_eval/utils.py`` ``get_rolling_token_windows``, v0.4.10 and later), and the
jobs' results are compared with the unsplit model scored on those tokens, for three tokenizer conventions:
SmolLM2 (a BOS it does not add), Gemma 3 (a BOS it adds) and a Qwen2-style tokenizer (no BOS: the prefix is
the EOS) under a tiny random Qwen2 model.
"""

from __future__ import annotations

import json

import h5py
import pytest
import torch
from conftest import run_jobs

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello", "  leading spaces and a tab\tinside",
         "a longer row " * 12 + "that the first window cuts", "<bos>a row that starts with Gemma's BOS text",
         "<|im_start|>user\nhi there"]
PAIRS = [("The capital of France is ", "Paris"), ("Question: 2 + 2 =", " 4"), ("", "An empty context"),
         ("Once upon a time", " there was a fox"), ("trailing spaces   ", "move"), ("word " * 30, "end of it")]
MAX_LENGTH = 24  # data.max_length: the harness's max_length is one less (a row here holds its last token too)


# --- the harness's rules, written from its code -------------------------------------------------------------

def _prefix(tok) -> int:
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def _tok_encode(tok, text: str, add_special_tokens=None) -> list[int]:
    kw = {}
    if add_special_tokens is not None:
        kw["add_special_tokens"] = add_special_tokens
    elif text.startswith(tok.decode(_prefix(tok))):
        kw["add_special_tokens"] = False
    return list(tok.encode(text, **kw))


def _request(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``loglikelihood``'s (context_enc, continuation_enc)."""
    if context == "":
        cont = _tok_encode(tok, continuation, add_special_tokens=False)
        return ([_prefix(tok)], cont) if _prefix(tok) != cont[0] else (cont[:1], cont[1:])
    n = len(context) - len(context.rstrip())
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    whole, ctx = _tok_encode(tok, context + continuation), _tok_encode(tok, context)
    return ctx, whole[len(ctx):]


def _first_window(tok, text: str, max_seq_len: int) -> tuple[list[int], list[int]]:
    """The first of ``loglikelihood_rolling``'s windows, made disjoint: (context, predicted tokens)."""
    tokens = _tok_encode(tok, text)
    n = min(max_seq_len, len(tokens))
    inp, pred = [_prefix(tok)] + tokens[:n - 1], tokens[:n]
    return inp[:len(inp) - (len(pred) - 1)], pred


def _score(model, ctx: list[int], cont: list[int], max_seq_len: int) -> tuple[float, bool]:
    """``_loglikelihood_tokens`` of one request: (sum of the continuation's log-probabilities, is_greedy)."""
    inp = (ctx + cont)[-(max_seq_len + 1):][:-1]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([inp])).logits[0].double(), -1)[-len(cont):]
    target = torch.tensor(cont)
    return logp.gather(1, target.unsqueeze(1)).sum().item(), bool((logp.argmax(-1) == target).all())


# --- the tokenizers and models --------------------------------------------------------------------------

def _qwen_like(folder, smollm2_path):
    """A tiny random Qwen2 model under a tokenizer with no BOS (lm-eval's prefix is then the EOS)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    tok.bos_token = None
    tok.eos_token = "<|endoftext|>"
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm2_path, gemma3_path):
    return {"smollm2": smollm2_path, "gemma3": gemma3_path,
            "qwen2": _qwen_like(tmp_path_factory.mktemp("qwen-like"), smollm2_path)}


def test_rules_are_the_harness_rules(models):
    """Tokens and scored spans of LmEval against the rules written above, for the three conventions."""
    from transformers import AutoTokenizer

    from nesa_hpc.io.tokenize import LmEval

    prefixes = {}
    for name, path in models.items():
        tok = AutoTokenizer.from_pretrained(path)
        rules = LmEval(tok)
        prefixes[name] = (rules.prefix, tok("a")["input_ids"][0] == rules.prefix)
        for text, got in zip(TEXTS, rules.texts(TEXTS, MAX_LENGTH), strict=True):
            ctx, pred = _first_window(tok, text, MAX_LENGTH - 1)
            assert got.ids == ctx + pred, (name, text)
            assert got.truncated == (len(_tok_encode(tok, text)) > MAX_LENGTH - 1)
        for prompt, completion in PAIRS:
            ctx, cont = _request(tok, prompt, completion)
            ids, n_prompt, truncated = rules.pair(prompt, completion, MAX_LENGTH)
            assert ids == (ctx + cont)[-MAX_LENGTH:] and len(ids) - n_prompt == len(cont), (name, prompt)
            assert truncated == (len(ctx + cont) > MAX_LENGTH)
    # the three conventions: a BOS not added, a BOS added (then predicted after the prefix), no BOS at all
    assert prefixes["smollm2"] == (1, False) and prefixes["gemma3"] == (2, True)
    assert prefixes["qwen2"][0] == AutoTokenizer.from_pretrained(models["qwen2"]).eos_token_id


def test_jobs_score_as_the_harness(models, tmp_path):
    """Split jobs (2 ranks, k=1, both head placements) under task.convention=lm_eval give the harness's
    log-likelihoods (``nll_sum`` = -loglikelihood), scored-token counts and is_greedy, for text rows (the first
    rolling window) and prompt/continuation pairs (each tokenizer's tokens of both kinds are checked above)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts, pairs = tmp_path / "texts.jsonl", tmp_path / "pairs.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    pairs.write_text("".join(json.dumps({"p": p, "c": c}) + "\n" for p, c in PAIRS))
    jobs, names = [], []
    # both kinds of row and both head placements; each tokenizer's tokens (Gemma 3's too) are checked above
    runs = (("qwen2", "texts", "owner"), ("qwen2", "pairs", "last"), ("smollm2", "texts", "last"),
            ("smollm2", "pairs", "owner"))
    for name, kind, head in runs:
        out = tmp_path / f"{name}-{kind}.h5"
        extra = ["data.prompt_field=p", "data.completion_field=c"] if kind == "pairs" else []
        jobs.append([f"model.path={models[name]}", f"data.path={texts if kind == 'texts' else pairs}",
                     f"output.path={out}", "task=score", "task.convention=lm_eval", "split.k=1",
                     f"split.head={head}", f"data.max_length={MAX_LENGTH}", "data.batch_size=3", "runtime.threads=1",
                     *extra])
        names.append((name, kind, out))
    assert run_jobs(2, jobs, tmp_path) == [None] * len(jobs)
    for name, kind, out in names:
        tok = AutoTokenizer.from_pretrained(models[name])
        model = AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float32).eval()
        with h5py.File(out) as f:
            assert json.loads(f.attrs["resume_key"])["convention"] == "lm_eval"
            res = {k: f[k][()] for k in ("row", "nll_sum", "n_tokens", "is_greedy", "n_prompt_tokens")}
        assert res["row"].tolist() == list(range(len(TEXTS if kind == "texts" else PAIRS)))
        for i in res["row"]:
            if kind == "texts":
                ctx, cont = _first_window(tok, TEXTS[i], MAX_LENGTH - 1)
            else:
                ctx, cont = _request(tok, *PAIRS[i])
            ll, greedy = _score(model, ctx, cont, MAX_LENGTH - 1)
            assert res["n_tokens"][i] == len(cont), (name, kind, i)
            # fp32 in batches against one row alone: 2e-4 a token; a token scored or tokenized otherwise moves
            # the sum by far more
            assert abs(-res["nll_sum"][i] - ll) <= 2e-4 * len(cont), (name, kind, i, -res["nll_sum"][i], ll)
            assert bool(res["is_greedy"][i]) == greedy
            assert ll <= 0
