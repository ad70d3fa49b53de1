"""Owner only: tokenize rows with the tokenizer's own conventions: a row truncated by the tokenizer itself, read by
bounded prefixes (:func:`encode_rows`), and a prompt with its continuation as an evaluation harness tokenizes them
(:func:`encode_pair`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["Encoded", "encode_rows", "encode_pair", "LmEval", "CONVENTIONS"]

# task.convention: "hf" tokenizes as the tokenizer does by default and scores every token after the first (what
# ``model(ids, labels=ids)`` computes); "lm_eval" follows lm-evaluation-harness's HF model (see LmEval)
CONVENTIONS = ("hf", "lm_eval")

log = logging.getLogger("nesa_hpc")


class Encoded(NamedTuple):
    """One row, tokenized by :func:`encode_rows`."""

    ids: list[int]     # exactly ``tokenizer(text, truncation=True, max_length=max_length)["input_ids"]``
    truncated: bool    # the whole row has more than ``max_length`` tokens
    n_tokens: int      # tokens of the whole row when ``exact``, else a lower bound (> max_length)
    exact: bool


# A row longer than this many characters per token of ``max_length`` is tokenized by prefixes (see encode_rows).
_CHARS_PER_TOKEN = 8
_MIN_PREFIX_CHARS = 256
_GROW = 4
_unsafe_warned: set[int] = set()


def _spaced_added_tokens(tokenizer) -> tuple[str, ...]:
    """Added (special) tokens whose text holds a space: one could straddle a cut at a space."""
    try:
        added = [t.content if hasattr(t, "content") else str(t) for t in tokenizer.added_tokens_decoder.values()]
    except AttributeError:
        added = []
    return tuple({t.lower() for t in added if " " in t})


def _safe_cut(text: str, limit: int, spaced: tuple[str, ...]) -> int | None:
    """The largest ``j <= limit`` where ``text[j]`` is a space right after a letter or digit (``text[j-1]``),
    not inside an added token that holds a space; None if there is none."""
    j = text.rfind(" ", 1, limit + 1)
    while j > 0:
        if text[j - 1].isalnum() and not any(t in text[max(0, j - len(t) + 1):j + len(t)].lower() for t in spaced):
            return j
        j = text.rfind(" ", 1, j)
    return None


def encode_rows(tokenizer, texts: Sequence[str], max_length: int, add_special_tokens: bool = True) -> list[Encoded]:
    """Tokenize ``texts`` with the tokenizer's defaults, truncated to ``max_length`` tokens by the tokenizer
    itself: ``ids`` are exactly ``tokenizer(text, truncation=True, max_length=max_length)["input_ids"]``, so
    special tokens are kept where the tokenizer keeps them (BERT: ``[CLS] ... [SEP]``; a BOS stays first),
    and ``truncated`` says whether the whole row has more than ``max_length`` tokens.

    A row of at most ``8 * max_length + 256`` characters is tokenized whole. A longer row is tokenized by
    *prefixes* only, so that a 100 MB row costs about as much as a short one: the prefix ends at a cut
    ``j`` where ``text[j]`` is a space and ``text[j - 1]`` a letter or digit. At such a cut the tokens of
    ``text[:j]`` are the first tokens of ``text``: the normalizers in use work character by character (a
    space composes with nothing), and the pre-tokenizers end a word there (BERT's whitespace split,
    byte-level BPE's regexes, whose matches never run from a letter into a space, Metaspace/SentencePiece,
    which starts a new piece at a space), and the model then tokenizes each word on its own, so what follows
    the cut cannot change a token before it; added tokens that hold a space are kept off the cut. As a
    check on a tokenizer without these properties, a second, shorter prefix (cut at about half) must give
    a prefix of the first one's tokens; if not, the row is tokenized whole (and a warning logged once).
    If the prefix has more than ``max_length`` tokens (special tokens counted), the row is truncated and
    ``tokenizer(prefix, truncation=True, max_length=...)`` equals the whole row's: it keeps the same first
    tokens and adds the same special tokens. Otherwise the prefix grows (4x) until it decides, or is the
    whole row. A row with no such cut (no spaces) is tokenized whole; so is every row of a tokenizer that
    truncates on the left (``truncation_side="left"``). ``add_special_tokens=False`` tokenizes without
    special tokens.
    """
    return _RowEncoder(tokenizer, texts, max_length, add_special_tokens).run()


class _RowEncoder:
    """One :func:`encode_rows` call: per row, the prefix length to try next and the last prefix that did not
    decide; rows go round (whole, or by a prefix) until each is decided."""

    def __init__(self, tokenizer, texts: Sequence[str], max_length: int, add_special_tokens: bool) -> None:
        self.tokenizer, self.texts, self.max_length = tokenizer, texts, max_length
        self.add_special_tokens = add_special_tokens
        self.kw = {} if add_special_tokens else {"add_special_tokens": False}
        n = len(texts)
        self.out: list[Encoded | None] = [None] * n
        self.finals: list[tuple[int, str]] = []          # rows to truncate: (index, text or a deciding prefix)
        self.prefixes = getattr(tokenizer, "truncation_side", "right") == "right"
        self.spaced = _spaced_added_tokens(tokenizer) if self.prefixes else ()
        self.limit = [_CHARS_PER_TOKEN * max_length + _MIN_PREFIX_CHARS] * n
        self.prev = [0] * n                               # the last prefix that did not decide
        self.whole_only: set[int] = set()

    def run(self) -> list[Encoded]:
        """Every row's :class:`Encoded`, in order."""
        pending = list(range(len(self.texts)))
        while pending:
            whole, cuts = self._plan(pending)
            if whole:
                self._encode_whole(whole)
            pending = self._encode_prefixes(cuts) if cuts else []
        if self.finals:
            self._truncate()
        return self.out

    def _plan(self, pending: list[int]) -> tuple[list[int], list[tuple[int, int, int | None]]]:
        """Rows to tokenize whole, and rows to tokenize by a prefix: (row, cut, the shorter check cut)."""
        whole, cuts = [], []
        for i in pending:
            j = self._next_cut(i)
            if j is None:
                whole.append(i)
            else:
                cuts.append((i, j, _safe_cut(self.texts[i], j // 2, self.spaced)))
        return whole, cuts

    def _next_cut(self, i: int) -> int | None:
        """The cut of row ``i``'s next prefix, past the last one that did not decide; None: tokenize it whole."""
        text = self.texts[i]
        while self.prefixes and i not in self.whole_only and self.limit[i] < len(text):
            j = _safe_cut(text, self.limit[i], self.spaced)
            if j is not None and j > self.prev[i]:
                return j
            self.limit[i] *= _GROW
        return None

    def _encode_whole(self, whole: list[int]) -> None:
        texts = self.texts
        for i, ids in zip(whole, self.tokenizer([texts[i] for i in whole], **self.kw)["input_ids"], strict=True):
            ids = list(ids)
            self.out[i] = Encoded(ids, len(ids) > self.max_length, len(ids), True)
            if len(ids) > self.max_length:
                self.finals.append((i, texts[i]))

    def _encode_prefixes(self, cuts: list[tuple[int, int, int | None]]) -> list[int]:
        """Tokenize each row's prefix (and its check prefix); returns the rows still undecided."""
        texts, pending = self.texts, []
        batch = [texts[i][:j] for i, j, _ in cuts] + [texts[i][:j1] for i, _, j1 in cuts if j1]
        encoded = self.tokenizer(batch, add_special_tokens=False)["input_ids"]
        special = self.tokenizer.num_special_tokens_to_add(pair=False) if self.add_special_tokens else 0
        checks = iter(encoded[len(cuts):])
        for (i, j, j1), ids in zip(cuts, encoded[:len(cuts)], strict=True):
            shorter = list(next(checks)) if j1 else []
            if list(ids[:len(shorter)]) != shorter:
                self._prefixes_unsafe(i)
                pending.append(i)
            elif len(ids) + special > self.max_length:
                self.out[i] = Encoded([], True, len(ids) + special, False)
                self.finals.append((i, texts[i][:j]))
            else:
                self.prev[i] = j
                self.limit[i] *= _GROW
                pending.append(i)
        return pending

    def _prefixes_unsafe(self, i: int) -> None:
        """A prefix of row ``i`` tokenized differently from the row: it goes whole (a warning, once per tokenizer)."""
        if id(self.tokenizer) not in _unsafe_warned:
            _unsafe_warned.add(id(self.tokenizer))
            log.warning("the tokenizer %s tokenizes a prefix of a row differently from the row: long "
                        "rows are tokenized whole", type(self.tokenizer).__name__)
        self.whole_only.add(i)

    def _truncate(self) -> None:
        """The rows over ``max_length`` tokens, truncated by the tokenizer (the row, or its deciding prefix)."""
        cut = self.tokenizer([t for _, t in self.finals], truncation=True, max_length=self.max_length,
                             **self.kw)["input_ids"]
        for (i, _), ids in zip(self.finals, cut, strict=True):
            self.out[i] = self.out[i]._replace(ids=list(ids))


def encode_pair(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], int, bool]:
    """A prompt and its continuation, tokenized as an evaluation harness's ``loglikelihood`` request: spaces
    that end the prompt move to the start of the continuation, ``prompt + completion`` is tokenized whole
    (the tokenizer's defaults, a BOS first where it adds one; special tokens it appends, such as BERT's
    ``[SEP]``, are left out), and the continuation is what follows the prompt's own tokens.

    Returns (ids, prompt tokens, truncated): a row over ``max_length`` tokens keeps its last ``max_length``
    (prompt tokens cut from the left, as the harness does); ValueError when the prompt has no token or the
    continuation is empty. A continuation that cannot fit with at least one prompt token gives
    ([], its token count, True)."""
    spaces = len(prompt) - len(prompt.rstrip())
    if spaces:
        prompt, completion = prompt[:-spaces], prompt[-spaces:] + completion
    # special tokens the tokenizer appends (BERT's [SEP], an EOS) end the text, not the prompt: dropped
    after = _appended_special_tokens(tokenizer)
    whole = list(tokenizer(prompt + completion)["input_ids"])
    whole = whole[:len(whole) - after]
    n_prompt = len(tokenizer(prompt)["input_ids"]) - after
    if n_prompt == 0:
        raise ValueError("the prompt has no tokens: the first completion token would have no context")
    if n_prompt >= len(whole):
        raise ValueError("the completion has no tokens")
    return _fit(whole, n_prompt, max_length)


def _fit(ids: list[int], n_prompt: int, max_length: int) -> tuple[list[int], int, bool]:
    """A prompt's and a continuation's ``ids`` in at most ``max_length`` tokens: the last ones (prompt tokens cut
    from the left); ([], the continuation's token count, True) when not even one prompt token fits."""
    if len(ids) <= max_length:
        return ids, n_prompt, False
    n_completion = len(ids) - n_prompt
    if n_completion > max_length - 1:
        return [], n_completion, True
    return ids[-max_length:], max_length - n_completion, True


class LmEval:
    """The rules of lm-evaluation-harness's HF model (``lm_eval/models/huggingface.py`` and
    ``lm_eval/api/model.py``, v0.4.10 and later) for ``loglikelihood`` and ``loglikelihood_rolling``:

    - a text is tokenized with the tokenizer's defaults (a BOS first where the tokenizer adds one), without
      special tokens when it already starts with the prefix token's text;
    - the prefix token is the tokenizer's BOS, else its EOS;
    - a text row is scored as the first window of ``loglikelihood_rolling``: the prefix token, then the text's
      tokens, every one of them predicted (a BOS the tokenizer adds is predicted after the prefix, as there);
    - a prompt/continuation pair moves the prompt's trailing spaces to the continuation and is the prompt's
      own tokens followed by the continuation's (the tokens of ``prompt + continuation`` after as many as the
      prompt has); an empty prompt is the prefix token, the continuation tokenized without special tokens
      (unless it already starts with the prefix token, which then serves as the context).

    The harness's ``max_length`` L is the model's input; a row here holds its last token too, so
    ``data.max_length`` = L + 1 gives the same windows and truncation."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise ValueError("task.convention=lm_eval needs a tokenizer with a BOS or an EOS token (the prefix "
                             "token lm-eval puts before a text)")
        self.prefix = prefix
        self.prefix_text = tokenizer.decode(prefix)
        self.appended = _appended_special_tokens(tokenizer)

    def encode(self, text: str) -> list[int]:
        """lm-eval's ``tok_encode``: the tokenizer's defaults, no special tokens if ``text`` starts with the
        prefix token's text."""
        kw = {"add_special_tokens": False} if text.startswith(self.prefix_text) else {}
        return list(self.tokenizer(text, **kw)["input_ids"])

    def texts(self, texts: Sequence[str], max_length: int) -> list[Encoded]:
        """Each text as the first window of ``loglikelihood_rolling``: the prefix token and the text's first
        ``max_length - 1`` tokens (``truncated`` when it has more; ``n_tokens`` counts the prefix)."""
        out: list[Encoded | None] = [None] * len(texts)
        for plain in (False, True):  # texts with and without the tokenizer's special tokens
            index = [i for i, t in enumerate(texts) if t.startswith(self.prefix_text) == plain]
            if not index:
                continue
            part = [texts[i] for i in index]
            if self.appended:  # truncation would keep the appended tokens: tokenize whole, then cut
                whole = [self.encode(t) for t in part]
                encoded = [Encoded(ids[:max_length - 1], len(ids) > max_length - 1, len(ids), True) for ids in whole]
            else:
                encoded = encode_rows(self.tokenizer, part, max_length - 1, add_special_tokens=not plain)
            for i, e in zip(index, encoded, strict=True):
                out[i] = Encoded([self.prefix, *e.ids], e.truncated, e.n_tokens + 1, e.exact) if e.n_tokens else e
        return out

    def pair(self, prompt: str, completion: str, max_length: int) -> tuple[list[int], int, bool]:
        """A ``loglikelihood`` request as (ids, prompt tokens, truncated), truncated as :func:`encode_pair`."""
        if prompt == "":
            cont = list(self.tokenizer(completion, add_special_tokens=False)["input_ids"])
            if not cont:
                raise ValueError("the completion has no tokens")
            ctx, cont = ([self.prefix], cont) if cont[0] != self.prefix else (cont[:1], cont[1:])
        else:
            spaces = len(prompt) - len(prompt.rstrip())
            if spaces:
                prompt, completion = prompt[:-spaces], prompt[-spaces:] + completion
            ctx = self.encode(prompt)
            cont = self.encode(prompt + completion)[len(ctx):]
        if not ctx:
            raise ValueError("the prompt has no tokens: the first completion token would have no context")
        if not cont:
            raise ValueError("the completion has no tokens")
        return _fit(ctx + cont, len(ctx), max_length)


def _appended_special_tokens(tokenizer) -> int:
    """How many special tokens the tokenizer puts after a text's own tokens (0 for most decoders)."""
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return len(full) - start - len(plain)
    return 0

