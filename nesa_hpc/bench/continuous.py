"""transformers continuous batching (``ContinuousBatchingManager``) on an OpenAI batch file, greedy, each
request with its own max tokens: the strongest one-process baseline of the variable-length workload.

Run as ``python -m nesa_hpc.bench.continuous SPEC_JSON`` so that each thread count gets a fresh process
(``torch.set_num_threads`` cannot leak into the next run); SPEC_JSON names ``folder``, ``data``, ``max_length``,
``threads``, ``attn``, ``max_batch_tokens`` (null = transformers' default), ``num_blocks`` (null = enough for
every request at once) and ``out``, where the result JSON is written; with ``ready`` and ``go`` (file paths)
the process creates ``ready`` once the model and its cache are set up and starts timing only when ``go``
exists, so that several such processes run the workload at the same time."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time

import torch

from ..io import jsonfile
from ..io.batch import make_batches
from ..io.inputs import RowFields
from ..io.read import read_rows

__all__ = ["load_requests", "continuous_generate", "main"]


def load_requests(data: str, tokenizer, max_length: int) -> list[tuple[int, list[int], int]]:
    """``(row, prompt ids, max tokens)`` of every line of the OpenAI batch file ``data``, tokenized as the
    pipeline tokenizes them."""
    out = []
    rows = read_rows(data, "openai_batch", fields=RowFields(openai=True))
    for b in make_batches(rows, tokenizer, 1, max_length, "left"):
        request = b.requests[0]
        out.append((int(b.rows[0]), b.ids[0].tolist(), int(dict(request.options)["max_new_tokens"])))
    return out


def _timed(model) -> dict:
    """Wrap ``model.forward`` to add its wall time to the returned dict's ``seconds`` (and count calls)."""
    clock = {"seconds": 0.0, "calls": 0}
    forward = model.forward

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            clock["seconds"] += time.perf_counter() - start
            clock["calls"] += 1

    model.forward = timed
    return clock


def _resolved(manager, model) -> dict:
    """The continuous batching settings in effect (after transformers resolved its defaults)."""
    c = manager.continuous_batching_config
    return {"attn_implementation": model.config._attn_implementation, "page_size": c.page_size,
            "num_blocks": c.num_blocks, "max_batch_tokens": c.max_batch_tokens,
            "max_requests_per_batch": c.max_requests_per_batch, "scheduler": c.scheduler_type,
            "use_async_batching": c.use_async_batching, "use_cuda_graph": list(c.cuda_graph_booleans),
            "allow_block_sharing": c.allow_block_sharing}


def _manager(model, stack: contextlib.ExitStack, gen_config, blocks: int, max_batch_tokens):
    """transformers' continuous-batching manager with ``blocks`` KV cache blocks, or with half as many, and so
    on, while transformers finds that they do not fit in the memory available (every row of a large
    workload at once would not)."""
    from transformers import ContinuousBatchingConfig

    while True:
        config = ContinuousBatchingConfig(num_blocks=blocks, max_batch_tokens=max_batch_tokens)
        try:
            return stack.enter_context(model.continuous_batching_context_manager(
                generation_config=gen_config, continuous_batching_config=config, block=True))
        except MemoryError:
            if blocks <= 16:
                raise
            blocks //= 2


def continuous_generate(spec: dict) -> dict:
    """Greedy continuous batching of every request of ``spec["data"]`` in one process: each row's tokens (cut
    after the first EOS and at its max tokens), seconds from the first request to the last result, and the
    share of that time spent inside the model's forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, ContinuousBatchingConfig, GenerationConfig

    from ..infer.generate import eos_token_ids
    from .generate import until_eos

    torch.set_num_threads(int(spec["threads"]))
    folder = spec["folder"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 attn_implementation=spec["attn"]).eval()
    eos = sorted(eos_token_ids(tokenizer, folder, model.config))
    requests = load_requests(spec["data"], tokenizer, int(spec["max_length"]))
    page = ContinuousBatchingConfig().page_size
    blocks = spec.get("num_blocks") or sum(math.ceil((len(ids) + cap) / page) for _, ids, cap in requests) + 2
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=max(c for *_, c in requests), eos_token_id=eos,
                                  pad_token_id=eos[0] if eos else 0)
    clock = _timed(model)
    results = {}
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        manager = _manager(model, stack, gen_config, blocks, spec.get("max_batch_tokens"))
        settings = _resolved(manager, model)
        if spec.get("ready"):
            open(spec["ready"], "w").close()
            while not os.path.exists(spec["go"]):
                time.sleep(0.01)
        clock.update(seconds=0.0, calls=0)
        start = time.perf_counter()
        ids = {manager.add_request(p, request_id=f"row-{r}", max_new_tokens=c, eos_token_id=eos): r
               for r, p, c in requests}
        while len(results) < len(ids):
            out = manager.get_result(timeout=60)
            if out is None:
                raise RuntimeError(f"continuous batching stopped with {len(ids) - len(results)} requests unfinished")
            if out.is_finished():
                results[ids[out.request_id]] = out.generated_tokens
        seconds = time.perf_counter() - start
        steps = manager.current_batch
    caps = {r: c for r, _, c in requests}
    tokens = {r: until_eos(list(t), eos, caps[r]) for r, t in results.items()}
    generated = sum(len(t) for t in tokens.values())
    return {"seconds": seconds, "generated": generated, "generated_per_s": generated / seconds,
            "forward_seconds": clock["seconds"], "forward_share": clock["seconds"] / seconds, "steps": steps,
            "tokens": tokens, "settings": settings}


def main(argv: list[str] | None = None) -> None:
    """Read the spec from the first argument, run, write the result JSON to ``spec["out"]``."""
    spec = json.loads((argv if argv is not None else sys.argv[1:])[0])
    result = continuous_generate(spec)
    with open(spec["out"], "w") as fh:
        fh.write(jsonfile.dumps(result))


if __name__ == "__main__":
    main()
