"""Pieces of the engine without MPI: every message survives the wire format, the training schedule's orders
agree across ranks (and a wrong one is caught), and a generation lane's KV cache (rows kept, columns
dropped, rows joining later) gives each row what it would get alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nesa_hpc.engine.messages import MESSAGES, Activations, Kind, TrainForward, decode
from nesa_hpc.engine.schedule import Action, TrainingRole, check_order, step_order
from nesa_hpc.engine.stage import lane_step
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
    """Rows join a lane at different steps (left-padded to the lane's timeline), others leave and columns no
    row uses are dropped; every step's logits equal the model run on that row alone (sliding window 4 <
    the rows' lengths)."""
    adapter, model = sliding_model
    layers = range(adapter.num_layers)
    g = torch.Generator().manual_seed(0)
    prompts = {0: torch.randint(5, 500, (7,), generator=g), 1: torch.randint(5, 500, (3,), generator=g),
               2: torch.randint(5, 500, (9,), generator=g)}
    seqs = {r: p.tolist() for r, p in prompts.items()}
    plan = {0: [0], 2: [1, 2], 4: []}  # step -> rows joining; row 0 leaves after step 3
    cache, rows, mask = None, [], None

    def run(part, c):
        ids, m, pos = part
        return adapter.run_layers(layers, adapter.embed(ids, pos), m, pos, c)

    with torch.inference_mode():
        for step in range(7):
            keep = [i for i, r in enumerate(rows) if not (r == 0 and step == 4)]
            dec = join = None
            if keep:
                rows = [rows[i] for i in keep]
                m = mask[keep]
                used = m.any(0).nonzero()
                m = torch.cat([m[:, int(used[0]):], torch.ones(len(keep), 1, dtype=torch.long)], dim=1)
                ids = torch.tensor([[seqs[r][-1]] for r in rows])
                pos = torch.tensor([[len(seqs[r]) - 1] for r in rows])
                dec = (ids, m, pos)
            joins = plan.get(step, [])
            if joins:
                T = max(len(prompts[r]) for r in joins)
                jm = torch.zeros(len(joins), T, dtype=torch.long)
                jids = torch.zeros(len(joins), T, dtype=torch.long)
                for i, r in enumerate(joins):
                    jm[i, T - len(prompts[r]):] = 1
                    jids[i, T - len(prompts[r]):] = prompts[r]
                join = (jids, jm, (jm.cumsum(-1) - 1).clamp(min=0))
            past = dec[1].shape[1] - 1 if dec else 0
            cache, d_out, j_out = lane_step(cache, torch.tensor(keep), past, dec, join, run, adapter.new_cache)
            outs = [o[:, -1] for o in (d_out, j_out) if o is not None]
            logits = adapter.logits(adapter.norm(torch.cat(outs)))
            rows = rows + joins
            masks = [x[1] for x in (dec, join) if x is not None]
            width = max(x.shape[1] for x in masks)
            mask = torch.cat([torch.nn.functional.pad(x, (width - x.shape[1], 0)) for x in masks])
            for i, r in enumerate(rows):
                alone = model(torch.tensor([seqs[r]])).logits[0, -1]
                torch.testing.assert_close(logits[i], alone, rtol=1e-4, atol=1e-4)
                seqs[r].append(int(alone.argmax()))
