"""Gemma-style tokenizer conventions (the tokenizer adds BOS, the chat template writes it too, turns end with a
special token): nesa_hpc must give the ids and stops plain transformers gives."""

from __future__ import annotations

from nesa_hpc.infer.decoding import Decoding, Stopper
from nesa_hpc.infer.files import chat
from nesa_hpc.io.batch import make_batches

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
            "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def _gemma_like():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "user", "model", "hi", "there"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    fast.chat_template = TEMPLATE
    return fast


def test_chat_prompt_has_one_bos_like_apply_chat_template():
    tok = _gemma_like()
    assert tok("hi")["input_ids"] == [2, 8]  # the tokenizer adds BOS itself
    want = tok.apply_chat_template([{"role": "user", "content": "hi there"}], tokenize=True,
                                   add_generation_prompt=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    assert want.count(2) == 1
    batch = next(make_batches([(0, chat(tok, "hi there"))], tok, 1, 64))
    assert batch.ids[0].tolist() == want


def test_stop_string_that_is_a_special_token():
    tok = _gemma_like()
    stopper = Stopper(Decoding(10, stop=("<end_of_turn>",), eos_ids=frozenset({1})), tok)
    assert stopper.check([8, 9]) == (None, None)
    assert stopper.check([8, 9, 5]) == ("stop", "hi there")  # decode skips <end_of_turn>: matched by id
    assert stopper.check([8, 1]) == ("eos", None)
