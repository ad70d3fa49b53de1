"""Pieces of the engine without MPI: every message survives the wire format, the training schedule's orders
agree across ranks (and a wrong one is caught), and a generation lane's KV cache (rows kept, columns
dropped, rows joining later) gives each row what it would get alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nesa_hpc.engine.lanes import LaneCache, LanePlan
from nesa_hpc.engine.messages import MESSAGES, Activations, Kind, TrainForward, decode
from nesa_hpc.engine.schedule import Action, TrainingRole, check_order, step_order
from nesa_hpc.engine.transport import decode_header, encode_header


def _example(cls):
    """A message of ``cls`` with small distinct tensors (and ints) in every field."""
    values = []
    for i, f in enumerate(dataclasses.fields(cls)[1:]):
        values.append(3 + i if f.type == "int" else torch.arange(6, dtype=torch.int32).view(2, 3) + i)
    return cls(7, *values)


@pytest.mark.parametrize("cls", sorted(MESSAGES.values(), key=lambda c: c.kind), ids=lambda c: c.__name__)
def test_every_message_survives_the_wire_format(cls):
    msg = _example(cls)
    tensors = msg.tensors
    kind, batch_id, specs = decode_header(encode_header(msg.kind, msg.batch_id, tensors))
    assert [(dt, shape) for dt, shape in specs] == [(t.dtype, tuple(t.shape)) for t in tensors]
    back = decode(kind, batch_id, [t.clone() for t in tensors])
    assert type(back) is cls and back.batch_id == 7
    for f in dataclasses.fields(cls)[1:]:
        a, b = getattr(msg, f.name), getattr(back, f.name)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, f.name


def test_message_kinds_are_distinct_and_packing_casts_to_wire_dtypes():
    assert len(MESSAGES) == len({c.kind for c in MESSAGES.values()}) == len(MESSAGES)
    with pytest.raises(ValueError, match="unknown message kind"):
        decode(99, 0, [])
    act = Activations.pack(0, torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.long),
                           torch.arange(2).view(1, 2), torch.full((1,), -1), torch.bfloat16)
    assert [t.dtype for t in act.tensors] == [torch.bfloat16, torch.int8, torch.int32, torch.int32]
    fwd = TrainForward.pack(3, act, micro_batches=4, step=9)
    assert fwd.kind == Kind.TRAIN_FWD and fwd.tensors[-1].tolist() == [4, 9]


@pytest.mark.parametrize("pipeline", ["gpipe", "1f1b"])
@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("micro", [1, 2, 7])
def test_step_orders_run_every_action_once(pipeline, world, micro):
    for grads in ((True,) * world, (False,) + (True,) * (world - 1), (False,) * (world - 1) + (True,)):
        orders = step_order(pipeline, micro, world, world, grads)
        owner = orders[0]
        assert sorted(a for a in owner if a.op == "F") == [Action("F", m) for m in range(micro)]
        assert [a for a in owner if a.op == "L"] == [Action("L", m) for m in range(micro)]
        assert len([a for a in owner if a.op == "B"]) == (micro if grads[0] else 0)
        for r in range(1, world):
            backs = [a.micro for a in orders[r] if a.op == "B"]
            assert backs == (list(range(micro)) if grads[r] else [])
            if pipeline == "1f1b" and grads[r]:  # micro-batches holding activations on rank r at once
                held, most = 0, 0
                for a in orders[r]:
                    held += 1 if a.op == "F" else -1
                    most = max(most, held)
                assert most <= min(world - r + 1, micro)


def test_a_schedule_that_would_hang_is_refused():
    grads = (True, True)
    good = step_order("1f1b", 2, 2, 2, grads)
    # the worker asks for the gradient of micro-batch 1 before rank 0 has even sent its forward
    bad = (good[0], (Action("F", 0), Action("B", 1), Action("F", 1), Action("B", 0)))
    with pytest.raises(RuntimeError, match="would hang"):
        check_order(bad, grads)
    role = TrainingRole("1f1b", 2, grads, position=1)
    assert role.order(2) == good[1] and role.backward and role.sends_back


@pytest.fixture(scope="module")
def sliding_model(tmp_path_factory, minilm_path):
    from families import save_family

    from nesa_hpc.models.weights import build_adapter, load_modules

    folder = save_family(tmp_path_factory.mktemp("lane") / "mistral", "mistral", minilm_path)
    adapter = build_adapter(str(folder))
    names = [*adapter.stage_modules, *adapter.embed_modules, *adapter.head_modules,
             *(adapter.layer_module(i) for i in range(adapter.num_layers))]
    load_modules(adapter, str(folder), names, "float32", torch.device("cpu"))
    from transformers import AutoModelForCausalLM

    return adapter, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_a_lane_gives_every_row_what_it_gets_alone(sliding_model):
    """Rows join a lane at different steps, one with its prompt in chunks of 4 over several steps, another
    leaves and columns no row uses are dropped; every picked token's logits equal the model run on that row
    alone (sliding window 4 < the rows' lengths)."""
    adapter, model = sliding_model
    layers = range(adapter.num_layers)
    g = torch.Generator().manual_seed(0)
    prompts = {r: torch.randint(5, 500, (n,), generator=g).tolist() for r, n in ((0, 7), (1, 3), (2, 9))}
    seqs = {r: list(p) for r, p in prompts.items()}
    starts = {0: [0], 1: [1], 2: [2]}  # step -> rows starting their prompt
    CHUNK = 4
    lane = LaneCache()
    running, mask = [], None          # running rows in cache order, their timeline mask
    filling, fill_mask, sent = [], None, {}  # rows whose prompt is arriving, their timeline, prompt tokens sent

    def run(part, cache):
        ids, m, pos = part
        return adapter.run_layers(layers, adapter.embed(ids, pos), m, pos, cache)

    def trim(m):
        used = m.any(0).nonzero()
        return m[:, int(used[0]):]

    with torch.inference_mode():
        for step in range(9):
            keep = [i for i, r in enumerate(running) if not (r == 0 and step == 5)]  # row 0 leaves at step 5
            running = [running[i] for i in keep]
            dec = None
            if running:
                m = torch.cat([trim(mask[keep]), torch.ones(len(keep), 1, dtype=torch.long)], dim=1)
                dec = (torch.tensor([[seqs[r][-1]] for r in running]), m,
                       torch.tensor([[len(seqs[r]) - 1] for r in running]))
            joins = filling + starts.get(step, [])
            join, done = None, torch.zeros(0, dtype=torch.bool)
            if joins:
                chunks = []
                for r in joins:
                    left = len(prompts[r]) - sent.get(r, 0)
                    chunks.append(left - CHUNK * ((left - 1) // CHUNK) if r not in sent else min(CHUNK, left))
                W = max(chunks)
                ids, part, pos = (torch.zeros(len(joins), W, dtype=torch.long) for _ in range(3))
                for i, (r, c) in enumerate(zip(joins, chunks, strict=True)):
                    s0 = sent.get(r, 0)
                    ids[i, W - c:] = torch.tensor(prompts[r][s0:s0 + c])
                    part[i, W - c:] = 1
                    pos[i, W - c:] = torch.arange(s0, s0 + c)
                    sent[r] = s0 + c
                hist = trim(fill_mask) if filling else torch.zeros(0, 0, dtype=torch.long)
                hist = torch.cat([hist, hist.new_zeros(len(joins) - len(hist), hist.shape[1])])
                join = (ids, torch.cat([hist, part], dim=1), pos)
                done = torch.tensor([sent[r] == len(prompts[r]) for r in joins])
            plan = LanePlan(torch.tensor(keep, dtype=torch.long), dec[1].shape[1] - 1 if dec else 0,
                            torch.arange(len(filling)), join[1].shape[1] - join[0].shape[1] if join else 0, done)
            d_out, j_out = lane.step(plan, dec, join, run, adapter.new_cache)
            outs = [o[:, -1] for o in (d_out, j_out[done] if j_out is not None else None) if o is not None]
            picked = running + [r for r, d in zip(joins, done.tolist(), strict=True) if d]
            masks = [x for x in (dec[1] if dec else None, join[1][done] if join else None) if x is not None and len(x)]
            if masks:
                width = max(x.shape[1] for x in masks)
                mask = torch.cat([torch.nn.functional.pad(x, (width - x.shape[1], 0)) for x in masks])
            filling = [r for r, d in zip(joins, done.tolist(), strict=True) if not d]
            fill_mask = join[1][~done] if filling else None
            running = picked
            if not picked:
                continue
            logits = adapter.logits(adapter.norm(torch.cat(outs)))
            for i, r in enumerate(picked):
                alone = model(torch.tensor([seqs[r]])).logits[0, -1]
                torch.testing.assert_close(logits[i], alone, rtol=1e-4, atol=1e-4)
                seqs[r].append(int(alone.argmax()))
    # row 0 fills over steps 0-1 and leaves at 5; row 1 joins whole at 1; row 2 fills over steps 2-4
    assert {r: len(seqs[r]) - len(prompts[r]) for r in prompts} == {0: 4, 1: 8, 2: 5}


def test_lane_cache_layers_append_in_place_and_hold_what_concatenation_holds():
    """A full-attention layer of a lane's cache writes each decode step's column into room kept after its
    keys (no copy of the cache), and through rows leaving, columns dropped, rows split off and joined it
    holds exactly what concatenating (transformers' DynamicLayer) holds."""
    from transformers import LlamaConfig
    from transformers.cache_utils import DynamicLayer

    from nesa_hpc.models.adapter import StageCache

    config = LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=32, vocab_size=50)
    cache = StageCache(config=config)
    ref = [DynamicLayer() for _ in range(2)]
    g = torch.Generator().manual_seed(0)

    def step(rows: int, cols: int):
        for i, layer in enumerate(cache.layers):
            k, v = (torch.randn(rows, 1, cols, 8, generator=g) for _ in range(2))
            ref[i].update(k, v)
            keys, values = layer.update(k, v)
            assert torch.equal(keys, ref[i].keys) and torch.equal(values, ref[i].values)

    step(3, 5)
    first = cache.layers[0].keys.data_ptr()
    for _ in range(4):
        step(3, 1)
    assert cache.layers[0].keys.data_ptr() == first  # appended in place
    rows = torch.tensor([2, 0])
    cache.keep_rows(rows)
    cache.keep_last(6)
    for r in ref:
        r.keys, r.values = r.keys[rows][..., -6:, :], r.values[rows][..., -6:, :]
    step(2, 1)
    other = cache.take_rows(torch.tensor([1]))
    cache.keep_rows(torch.tensor([0]))
    cache.add_rows(other)
    for i in range(2):
        assert torch.equal(cache.layers[i].keys, ref[i].keys) and torch.equal(cache.layers[i].values, ref[i].values)
    step(2, 1)
    step(2, 40)  # past the room: the layer moves to a larger buffer
    assert cache.layers[0].keys.shape[-2] == 48


def _left_padded(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, positions) (B, max length) of prompts of ``lengths`` padded on the left, as a lane's newcomers."""
    B, W = len(lengths), max(lengths)
    mask, pos = torch.zeros(B, W, dtype=torch.long), torch.zeros(B, W, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, W - n:], pos[i, W - n:] = 1, torch.arange(n)
    return mask, pos


_PACKING = {  # family: (config, where it packs: at most this many tokens, 0 = never)
    "llama": (dict(model_type="llama", num_key_value_heads=2), None),
    "gemma3_text": (dict(model_type="gemma3_text", num_key_value_heads=2, head_dim=8, sliding_window=40,
                         layer_types=["sliding_attention", "full_attention"] * 2), 39),
    "falcon": (dict(model_type="falcon", new_decoder_architecture=False, alibi=True, multi_query=True), 0),
    # rotary Falcon: packs where transformers' Falcon attention goes through the attention interface (5.25 on),
    # never where it is its own code (5.24: set below)
    "falcon-rotary": (dict(model_type="falcon", new_decoder_architecture=True, alibi=False, num_kv_heads=2), None),
}


@pytest.mark.parametrize("family", sorted(_PACKING))
def test_prompts_packed_into_one_row_equal_the_padded_batch(family):
    """Newcomers' prompts of different lengths run packed into one row without their padding (each attends only
    to itself): the states, the KV cache laid out as the padded batch, and a decode step after it equal the padded
    forward. A sliding window packs at most its width less one token; ALiBi never packs, nor attention that is a
    family's own code rather than transformers' attention interface (Falcon in transformers 5.24)."""
    import sys

    from transformers import AutoConfig, AutoModelForCausalLM

    from nesa_hpc.models.adapter import make_adapter

    spec, limit = _PACKING[family]
    if family == "falcon-rotary":
        import transformers.models.falcon.modeling_falcon as falcon

        limit = None if hasattr(falcon, "ALL_ATTENTION_FUNCTIONS") else 0
    config = AutoConfig.for_model(**spec, vocab_size=300, hidden_size=32, num_hidden_layers=4,
                                  num_attention_heads=4, intermediate_size=48, max_position_embeddings=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    adapter = make_adapter(model)
    assert adapter.pack_limit == (sys.maxsize if limit is None else limit)
    lengths = [13, 5, 9, 1, 11]  # 39 tokens
    (B, W), (mask, pos) = (len(lengths), max(lengths)), _left_padded(lengths)
    layers = range(1, 4)
    h = adapter.embed(torch.randint(5, 300, (B, W)), pos, mask)
    step = torch.randn(B, 1, h.shape[-1])
    step_mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], dim=1)
    step_pos = torch.tensor([[n] for n in lengths])
    real = mask.bool()
    with torch.inference_mode():
        padded_cache, packed_cache = adapter.new_cache(), adapter.new_cache()
        assert adapter._packs(layers, h, mask, pos, packed_cache) == (limit != 0)
        padded = adapter._run(layers, h, mask, pos, padded_cache)
        packed = adapter.run_layers(layers, h, mask, pos, packed_cache)
        torch.testing.assert_close(packed[real], padded[real], rtol=1e-5, atol=1e-5)
        if limit == 0:
            return
        assert not packed[~real].any()
        for i in layers:
            a, b = padded_cache.layers[i], packed_cache.layers[i]
            assert a.keys.shape == b.keys.shape
            assert getattr(a, "cumulative_length", None) == getattr(b, "cumulative_length", None)
            cols = real[:, -a.keys.shape[2]:]
            torch.testing.assert_close(b.keys.transpose(1, 2)[cols], a.keys.transpose(1, 2)[cols])
            torch.testing.assert_close(b.values.transpose(1, 2)[cols], a.values.transpose(1, 2)[cols])
        torch.testing.assert_close(adapter.run_layers(layers, step, step_mask, step_pos, packed_cache),
                                   adapter.run_layers(layers, step, step_mask, step_pos, padded_cache),
                                   rtol=1e-5, atol=1e-5)
        # one token more than a sliding window keeps: the padded forward
        if limit is not None:
            longer = torch.cat([mask[:, :1], mask], dim=1)
            longer[0, 0] = 1
            assert not adapter._packs(layers, torch.cat([h[:, :1], h], 1), longer, pos, adapter.new_cache())


def test_every_decoder_family_packs_prompts_as_it_pads_them():
    """Every decoder family (tests/families.py, sliding windows widened to hold the packed prompts): a packed
    forward over newcomers' prompts and the decode step after it equal the padded batch; it packs wherever the
    attention is SDPA, not ALiBi, through transformers' attention interface."""
    from families import _COMMON, DECODERS
    from transformers import AutoConfig, AutoModelForCausalLM

    from nesa_hpc.models.adapter import make_adapter

    lengths = [13, 5, 9, 1, 11]
    (B, W), (mask, pos) = (len(lengths), max(lengths)), _left_padded(lengths)
    step_mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], dim=1)
    step_pos = torch.tensor([[n] for n in lengths])
    packed_families = []
    for family, spec in DECODERS.items():
        spec = {**spec, **({"sliding_window": 64} if "sliding_window" in spec else {})}
        config = AutoConfig.for_model(family, vocab_size=300, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                      **{**_COMMON, **spec})
        torch.manual_seed(0)
        adapter = make_adapter(AutoModelForCausalLM.from_config(config).eval())
        layers = range(adapter.num_layers)
        with torch.inference_mode():
            h = adapter.embed(torch.randint(5, 300, (B, W)), pos, mask)
            step = adapter.embed(torch.randint(5, 300, (B, 1)), step_pos)
            padded_cache, packed_cache = adapter.new_cache(), adapter.new_cache()
            packs = adapter._packs(layers, h, mask, pos, packed_cache)
            assert packs == (config._attn_implementation == "sdpa" and not getattr(config, "alibi", False)), family
            padded = adapter._run(layers, h, mask, pos, padded_cache)
            packed = adapter.run_layers(layers, h, mask, pos, packed_cache)
            torch.testing.assert_close(packed[mask.bool()], padded[mask.bool()], rtol=1e-5, atol=1e-5,
                                       msg=lambda m, f=family: f"{f}: {m}")
            torch.testing.assert_close(adapter.run_layers(layers, step, step_mask, step_pos, packed_cache),
                                       adapter.run_layers(layers, step, step_mask, step_pos, padded_cache),
                                       rtol=1e-5, atol=1e-5, msg=lambda m, f=family: f"{f}: {m}")
        packed_families += [family] * packs
    assert len(packed_families) >= len(DECODERS) - 2, packed_families  # all but Falcon (ALiBi), Gemma 2 (eager)
