"""A model split into parts, each computed by the family's own transformers code.

An :class:`Adapter` only *names* the parts of a transformers model: the token embedding, the list of
layers, the language-model head, and everything else (positional embeddings, rotary embeddings, final
norms, ...), which every rank loads because it is small. It never re-derives a family's math. To run a
block of layers it calls the family's own ``forward`` with a *view* of the layer list:

- the layers before the block are skipped;
- a pre-hook on the block's first layer puts the stage's hidden states in;
- a hook on the block's last layer takes the result out and stops the forward there.

So embedding scale, rotary embeddings (per layer type), attention masks (causal, sliding window,
per-layer types, ALiBi), positional embeddings and every per-layer argument come from transformers.
The final norm runs inside the family's ``forward`` the same way (all layers skipped), and the logits
come from the family's causal-LM ``forward`` (head, logit soft-capping, logit scaling).
"""

from __future__ import annotations

import copy
import functools
import sys
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from ..errors import ConfigError

__all__ = ["Adapter", "make_adapter", "StageCache", "DECODER_MODEL_TYPES", "ENCODER_MODEL_TYPES",
           "SUPPORTED_MODEL_TYPES", "check_supported"]

# The families whose exactness the test suite checks (score, generate, training against plain transformers).
DECODER_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma2",
                       "gemma3_text", "phi3", "olmo2", "granite", "gpt2", "gpt_neox", "falcon", "opt")
# Families loaded as bare encoders (``AutoModel``): their output is ``last_hidden_state``; no LM head (embed).
ENCODER_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra")
SUPPORTED_MODEL_TYPES = DECODER_MODEL_TYPES + ENCODER_MODEL_TYPES
# Families whose layers return a tuple (hidden states first) rather than a tensor.
_TUPLE_LAYERS = frozenset({"falcon"})

# Prompts packed into one row (see ``Adapter.run_layers``): while a packed block runs, the family's attention
# modules dispatch to ``_packed_attention`` under this name, which runs the family's SDPA attention over each
# prompt alone; the lengths of the packed prompts, in order, are in ``_PACKED_LENGTHS``.
_PACKED = "nesa_packed_sdpa"
_PACKED_LENGTHS: list[int] = []


def _packed_attention(module, query, key, value, attention_mask, **kwargs):
    """Causal SDPA over each of the sequences packed into one row (query and key (1, heads, L, D), nothing
    cached before them); the same call as transformers' ``sdpa`` makes for one sequence of a batch."""
    if query.shape[2] != key.shape[2] or sum(_PACKED_LENGTHS) != query.shape[2]:
        raise RuntimeError("packed attention: the packed sequences do not cover the query and key positions")
    kwargs.pop("is_causal", None)
    outs, at = [], 0
    for n in _PACKED_LENGTHS:
        part = slice(at, at + n)
        out, _ = sdpa_attention_forward(module, query[:, :, part], key[:, :, part], value[:, :, part], None,
                                        is_causal=True, **kwargs)
        outs.append(out)
        at += n
    return torch.cat(outs, dim=1), None


AttentionInterface.register(_PACKED, _packed_attention)
AttentionMaskInterface.register(_PACKED, lambda *args, **kwargs: None)  # each sequence is causal on its own


def check_supported(config, where: str) -> None:
    """Refuse a model outside the supported families before any work, in one line."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

        arch = ", ".join(getattr(config, "architectures", None) or []) or \
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) or MODEL_MAPPING_NAMES.get(model_type) or "?"
        raise ConfigError(
            f"{where}: unsupported model architecture {arch} (model_type={model_type!r}); supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (see docs/models.md)")


class _Stop(Exception):
    """Raised by a hook to end the family's forward at the end of a stage, carrying the hidden states."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


class _Skip(nn.Module):
    """A layer that is not run: it returns its input (in the family's layer output convention)."""

    def __init__(self, as_tuple: bool, given: torch.Tensor | None = None) -> None:
        super().__init__()
        self.as_tuple = as_tuple
        self.given = given

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states if self.given is None else self.given
        return (out,) if self.as_tuple else out


class _Given(nn.Module):
    """Stands in for the base model under the causal-LM ``forward``: returns the given hidden states."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, *args, **kwargs):
        return _Output(self.hidden)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # a family's head forward may call a part of the base (OPT: model.decoder)
            return self


class _Output:
    """The base model's output as the causal-LM forward reads it: hidden states first; nothing else."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.last_hidden_state = hidden

    def __getitem__(self, i):
        return (self.last_hidden_state,)[i]

    def __getattr__(self, name):  # attentions, caches, router logits, ...: none
        return None


class _GrowingLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values are views of buffers with room after them: a decode
    step writes its new column in place, where ``DynamicLayer`` copies the whole cache to append it. The
    views are what attention reads, so the numbers are the same; the buffers grow by half when full."""

    _kbuf: torch.Tensor | None = None
    _vbuf: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self._kbuf = _appended(self.keys, self._kbuf, key_states)
        self.values, self._vbuf = _appended(self.values, self._vbuf, value_states)
        return self.keys, self.values

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (in their new order), with the buffers' room."""
        self.keys, self._kbuf = _selected(self.keys, self._kbuf, rows)
        self.values, self._vbuf = _selected(self.values, self._vbuf, rows)


def _start_in(view: torch.Tensor, buf: torch.Tensor | None) -> int | None:
    """The first column of ``buf`` that ``view`` (B, heads, S, D) starts at, when it is a run of whole columns
    of ``buf``; else None."""
    if buf is None or view.dim() != 4 or view.shape[:2] != buf.shape[:2] or view.shape[-1] != buf.shape[-1] \
            or view.stride() != buf.stride() or view.dtype != buf.dtype or view.device != buf.device:
        return None
    offset = view.data_ptr() - buf.data_ptr()
    column = view.stride(-2) * view.element_size()
    if offset < 0 or offset % column:
        return None
    start = offset // column
    return start if start + view.shape[-2] <= buf.shape[-2] else None


def _selected(view: torch.Tensor, buf: torch.Tensor | None,
              rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``rows`` of ``view``, as (the new view, its buffer): the buffer's rows with their room when ``view`` lies in
    ``buf``, else a plain copy (and no buffer)."""
    start = _start_in(view, buf)
    if start is None:
        return view[rows], None
    buf = buf[rows]
    return buf[:, :, start:start + view.shape[-2]], buf


def _appended(view: torch.Tensor, buf: torch.Tensor | None, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``view`` with ``new``'s columns after it, as (the new view, its buffer): written in place when ``buf``
    has room after ``view``, else copied once into a new buffer with room for half as many columns again."""
    if view.numel() == 0:
        view = new.new_zeros((*new.shape[:2], 0, new.shape[-1]))
        buf = None
    start = _start_in(view, buf)
    S, n = view.shape[-2], new.shape[-2]
    if start is None or start + S + n > buf.shape[-2] or view.shape[:2] != new.shape[:2]:
        buf = new.new_empty((*new.shape[:2], S + n + max(16, (S + n) // 2), new.shape[-1]))
        buf[:, :, :S] = view
        start = 0
    buf[:, :, start + S:start + S + n] = new
    return buf[:, :, start:start + S + n], buf


class StageCache(DynamicCache):
    """A KV cache for a model whose layers are spread over ranks: each process fills only its own layers.

    The family's forward sizes its masks (and reads the past length) from one layer of the cache, by
    default the first full-attention (or sliding) layer of the *model*; that layer may live on another
    rank, or (on rank 0, which holds two blocks) may not have seen this step yet. While a block runs,
    those questions are answered by a layer of the same kind inside the running block.
    """

    active: range | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for layer in self.layers:
            if type(layer) is DynamicLayer:
                layer.__class__ = _GrowingLayer

    def _here(self, layer_idx: int) -> int:
        block = self.active
        if block is None or layer_idx in block or len(block) == 0:
            return layer_idx
        kind = self.is_sliding[layer_idx] if layer_idx < len(self.layers) else False
        return next((i for i in block if i < len(self.layers) and self.is_sliding[i] == kind), block[0])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(self._here(layer_idx))

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, self._here(layer_idx))

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return super().get_query_offset(self._here(layer_idx))

    # -- rows of a generation lane: each row's cached positions end at the lane's last column (its
    # timeline), so a row that joined later is padded on the left, as in a left-padded batch
    def _filled(self) -> list:
        layers = [layer for layer in self.layers if layer.is_initialized and layer.keys.numel()]
        for layer in layers:
            if type(layer) not in _LANE_LAYERS:
                raise ConfigError(f"generation lanes cannot hold a {type(layer).__name__} cache layer")
        return layers

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices, in their new order) in every layer."""
        layers = self._filled()
        if layers and len(rows) == len(layers[0].keys) and bool((rows == torch.arange(len(rows),
                                                                                        device=rows.device)).all()):
            return  # every row stays where it is
        for layer in layers:
            if isinstance(layer, _GrowingLayer):
                layer.select_rows(rows)
            else:
                layer.keys, layer.values = layer.keys[rows], layer.values[rows]

    def keep_last(self, columns: int) -> None:
        """Drop every column of the timeline but the last ``columns`` (those no remaining row uses)."""
        for layer in self._filled():
            if isinstance(layer, DynamicSlidingWindowLayer):
                layer.cumulative_length = min(layer.cumulative_length, columns)
            stored = layer.keys.shape[-2]
            start = stored - min(stored, columns)
            layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]

    def add_empty_rows(self, n: int) -> None:
        """Append ``n`` rows that hold nothing yet (zeros in every cached column; their mask hides them)."""
        for layer in self._filled():
            pad = layer.keys.new_zeros((n, *layer.keys.shape[1:]))
            layer.keys = torch.cat([layer.keys, pad])
            layer.values = torch.cat([layer.values, layer.values.new_zeros((n, *layer.values.shape[1:]))])

    def take_rows(self, rows: torch.Tensor) -> StageCache:
        """A new cache holding only ``rows`` of this one (same timeline); this one is unchanged."""
        other = copy.copy(self)
        other.layers = [copy.copy(layer) for layer in self.layers]
        for layer in other._filled():
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]
        return other

    def unpack(self, layers: range, index: torch.Tensor) -> None:
        """After a block ran over sequences packed into one row (nothing cached before), lay the cached columns
        of ``layers`` out as a batch: ``index`` (B, T) holds each position's packed column, or the packed
        length where the position is padding (cached as zeros). A sliding-window layer then holds the last
        ``sliding_window - 1`` columns of the batch's timeline of T, as after a padded forward."""
        T = index.shape[1]
        for i in layers:
            layer = self.layers[i] if i < len(self.layers) else None
            if layer is None or not layer.is_initialized or not layer.keys.numel():
                continue
            # (1, heads, L, D) -> (L, heads, D) -> (B, T, heads, D) -> (B, heads, T, D)
            keys, values = (_unpacked(x[0].transpose(0, 1), index).transpose(1, 2).contiguous()
                            for x in (layer.keys, layer.values))
            if isinstance(layer, DynamicSlidingWindowLayer):
                layer.cumulative_length = T
                keys, values = keys[:, :, -layer.sliding_window + 1:], values[:, :, -layer.sliding_window + 1:]
            layer.keys, layer.values = keys, values
            if isinstance(layer, _GrowingLayer):
                layer._kbuf = layer._vbuf = None

    def add_rows(self, other: StageCache) -> None:
        """Append ``other``'s rows after this cache's, both padded on the left to the longer timeline."""
        for mine, theirs in zip(self.layers, other.layers, strict=True):
            if not (theirs.is_initialized and theirs.keys.numel()):
                continue
            if not (mine.is_initialized and mine.keys.numel()):
                raise ValueError("add_rows: this cache has no rows in a layer the other one fills")
            if type(mine) is not type(theirs) or type(mine) not in _LANE_LAYERS:
                raise ConfigError(f"generation lanes cannot hold a {type(mine).__name__} cache layer")
            if isinstance(mine, DynamicSlidingWindowLayer):
                timeline = max(mine.cumulative_length, theirs.cumulative_length)
                stored = min(timeline, mine.sliding_window - 1)
                mine.cumulative_length = timeline
            else:
                stored = max(mine.keys.shape[-2], theirs.keys.shape[-2])
            mine.keys = torch.cat([_pad_left(mine.keys, stored), _pad_left(theirs.keys, stored)])
            mine.values = torch.cat([_pad_left(mine.values, stored), _pad_left(theirs.values, stored)])


_LANE_LAYERS = (_GrowingLayer, DynamicSlidingWindowLayer)


def _unpacked(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Packed positions ``x`` (L, ...) laid out as a batch: ``index`` (B, T) holds each position's packed row,
    or L where the position is padding (zeros there); returns (B, T, ...)."""
    return torch.cat([x, x.new_zeros((1, *x.shape[1:]))])[index]


def _pad_left(x: torch.Tensor, columns: int) -> torch.Tensor:
    """(B, heads, S, D) -> (B, heads, columns, D), zeros before the S cached columns."""
    return torch.nn.functional.pad(x, (0, 0, columns - x.shape[-2], 0))


def _swap(parent: nn.Module, name: str, module: nn.Module):
    """Replace ``parent.<name>`` for the duration of a ``with`` block."""

    @contextmanager
    def swapped():
        old = parent._modules[name]
        parent._modules[name] = module
        try:
            yield
        finally:
            parent._modules[name] = old

    return swapped()


def _module_name(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((n for n, m in model.named_modules() if m is target), None)


class Adapter:
    """Names the parts of one transformers model and runs them through the family's own ``forward``.

    ``embed(ids, pos)`` -> ``run_layers(range, h, mask, pos, cache)`` ... -> ``norm(h)`` -> ``logits(h)``.
    The model is built on the meta device (see :mod:`nesa_hpc.models.weights`); a rank fills in only the modules
    it runs.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self.model_type = self.config.model_type
        self.base = model.base_model  # the model without its head (itself for an encoder)
        self.base_name = "" if self.base is model else model.base_model_prefix
        if self.base_name and model.get_submodule(self.base_name) is not self.base:
            raise ConfigError(f"{type(model).__name__}: cannot find its base model {self.base_name!r}")
        n = int(self.config.num_hidden_layers)
        lists = sorted((name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n),
                       key=lambda s: (s.count("."), s))
        if not lists:
            raise ConfigError(f"{type(model).__name__}: no list of {n} layers found")
        self._layers_name = lists[0]
        parent, _, self._layers_attr = self._layers_name.rpartition(".")
        self._layers_parent = model.get_submodule(parent)
        self._as_tuple = self.model_type in _TUPLE_LAYERS
        embed = _module_name(model, model.get_input_embeddings())
        if embed is None:
            raise ConfigError(f"{type(model).__name__}: no input embedding found")
        head = _module_name(model, model.get_output_embeddings()) if self.base is not model else None
        self._embed_dim = int(model.get_input_embeddings().embedding_dim)
        self.has_head = head is not None
        self.embed_modules: tuple[str, ...] = (embed,)
        self.head_modules: tuple[str, ...] = (head,) if head else ()
        # everything else is small (positions, rotary, norms, projections) and loaded wherever layers,
        # the embedding or the head run: the family's forward calls it around the layers
        big = (self._layers_name, embed, *self.head_modules)
        self.stage_modules: tuple[str, ...] = tuple(
            name for name, m in model.named_modules()
            if name and (m._parameters or m._buffers)
            and not any(name == b or name.startswith(b + ".") for b in big))
        tied = getattr(model, "_tied_weights_keys", None)
        self.tied: dict[str, str] = dict(tied) if isinstance(tied, dict) and \
            getattr(self.config, "tie_word_embeddings", False) else {}
        # RoBERTa-style embeddings derive positions from the token ids (offset past the padding index)
        self._own_positions = self.base is model and \
            getattr(getattr(self.base, "embeddings", None), "padding_idx", None) is not None

    # -- names ------------------------------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self._layers_parent._modules[self._layers_attr]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def output_size(self) -> int:
        """Width of what :meth:`norm` returns (the hidden size, or the head's input width where the family
        projects after its final norm)."""
        head = self.model.get_output_embeddings() if self.has_head else None
        return int(getattr(head, "in_features", 0) or self.hidden_size)

    def layer_module(self, i: int) -> str:
        return f"{self._layers_name}.{i}"

    def new_cache(self) -> StageCache:
        """An empty KV cache for generation over this model's layers (each stage fills its own)."""
        return StageCache(config=self.config)

    # -- running ----------------------------------------------------------------------------------------------
    def _view(self, first: int, given: torch.Tensor | None = None):
        """The layer list with layers [0, first) skipped (and, with ``given``, the last skipped layer
        returning ``given``)."""
        real = list(self.layers)
        skips = [_Skip(self._as_tuple) for _ in range(first)]
        if given is not None:
            skips[-1] = _Skip(self._as_tuple, given)
        return _swap(self._layers_parent, self._layers_attr, nn.ModuleList(skips + real[first:]))

    def _base_forward(self, **kwargs) -> torch.Tensor:
        try:
            out = self.base(**kwargs, use_cache=kwargs.get("cache") is not None, return_dict=True)
        except _Stop as stop:
            return stop.hidden
        return out.last_hidden_state

    def _dummy(self, h: torch.Tensor) -> torch.Tensor:
        """``inputs_embeds`` for a forward whose hidden states are put in by a hook: what the family does
        to it before the first layer is discarded (it only needs the shape, dtype and device)."""
        if h.shape[-1] == self._embed_dim:
            return h.detach()
        return h.new_zeros(*h.shape[:-1], self._embed_dim)

    def _positions(self, ids_given: bool, pos: torch.Tensor | None) -> dict:
        return {} if (ids_given and self._own_positions) or pos is None else {"position_ids": pos}

    def embed(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden states the first layer reads, (B, T, H), from token ids (B, T) at positions ``pos``."""
        first = self.layers[0]

        def stop(module, args, kwargs):
            raise _Stop(args[0] if args else kwargs["hidden_states"])

        handle = first.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            return self._base_forward(input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                                      **self._positions(True, pos))
        finally:
            handle.remove()

    def run_layers(self, layers: range, h: torch.Tensor, mask2d: torch.Tensor, pos: torch.Tensor,
                   cache=None) -> torch.Tensor:
        """Run ``layers`` (original indices, contiguous) over ``h`` (B, T, H); returns (B, T, H).

        With ``cache`` (a :class:`StageCache`, generation) ``h`` holds only the new positions, ``mask2d``
        (B, past + T) covers the cached ones too, and the layers read and extend their KV cache. Prompts of
        different lengths with nothing cached yet (a generation lane's newcomers) run packed into one row
        without their padding (:meth:`_packs`); the padded positions of the result and the cache are zeros.
        """
        if len(layers) == 0:
            return h
        first, last = layers[0], layers[-1]
        if list(layers) != list(range(first, last + 1)):
            raise ValueError(f"layers must be contiguous, got {layers}")
        if self._packs(layers, h, mask2d, pos, cache):
            return self._run_packed(layers, h, mask2d, pos, cache)
        return self._run(layers, h, mask2d, pos, cache)

    def _packs(self, layers: range, h: torch.Tensor, mask2d: torch.Tensor, pos: torch.Tensor | None, cache) -> bool:
        """Whether ``layers`` run packed over ``h``: a first chunk of two or more prompts with padding, nothing
        of ``layers`` cached yet, and at most :attr:`pack_limit` tokens."""
        if not isinstance(cache, StageCache) or pos is None or mask2d is None or mask2d.dim() != 2 \
                or h.shape[0] < 2 or mask2d.shape != h.shape[:2] or bool(mask2d.all()):
            return False
        filled = [cache.layers[i] for i in layers if i < len(cache.layers)]
        if any(layer.is_initialized and layer.keys.numel() for layer in filled):
            return False
        return int(mask2d.sum()) <= self.pack_limit

    @functools.cached_property
    def pack_limit(self) -> int:
        """The most prompt tokens :meth:`run_layers` runs packed into one row (0: never): the family's attention
        must be transformers' SDPA, reached through transformers' attention interface (in transformers 5.24
        Falcon's is its own code), and depend on positions only through the position ids (not ALiBi), and a
        sliding-window cache layer must keep every packed position (its window less one)."""
        modeling = sys.modules.get(type(self.model).__module__)
        if self.config._attn_implementation != "sdpa" or getattr(self.config, "alibi", False) \
                or getattr(modeling, "ALL_ATTENTION_FUNCTIONS", None) is None:
            return 0
        windows = [layer.sliding_window for layer in self.new_cache().layers
                   if isinstance(layer, DynamicSlidingWindowLayer)]
        return min(windows) - 1 if windows else sys.maxsize

    def _run_packed(self, layers: range, h: torch.Tensor, mask2d: torch.Tensor, pos: torch.Tensor,
                    cache: StageCache) -> torch.Tensor:
        """:meth:`_run` over the rows' real positions packed into one row, each row attending only to itself;
        the result and the cache laid out as the padded batch again."""
        B, T, H = h.shape
        real = mask2d.reshape(-1).bool()
        at = real.nonzero().squeeze(1)  # each packed column's place in the flat (B * T) batch
        L = len(at)
        index = torch.full((B * T,), L, dtype=torch.long, device=h.device)
        index[at] = torch.arange(L, device=h.device)
        index = index.view(B, T)
        lengths = [n for n in mask2d.bool().sum(1).tolist() if n]
        attn = self.config._attn_implementation_internal
        global _PACKED_LENGTHS
        _PACKED_LENGTHS, self.config._attn_implementation_internal = lengths, _PACKED
        try:
            out = self._run(layers, h.reshape(B * T, H)[at].unsqueeze(0),
                            torch.ones(1, L, dtype=mask2d.dtype, device=mask2d.device),
                            pos.reshape(-1)[at].unsqueeze(0), cache)
        finally:
            _PACKED_LENGTHS, self.config._attn_implementation_internal = [], attn
        cache.unpack(layers, index)
        return _unpacked(out[0], index)

    def _run(self, layers: range, h: torch.Tensor, mask2d: torch.Tensor, pos: torch.Tensor,
             cache=None) -> torch.Tensor:
        first, last = layers[0], layers[-1]

        def put_in(module, args, kwargs):
            if args:
                return (h, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h}

        def take_out(module, args, output):
            raise _Stop(output[0] if isinstance(output, tuple) else output)

        handles = [self.layers[first].register_forward_pre_hook(put_in, with_kwargs=True),
                   self.layers[last].register_forward_hook(take_out)]
        if isinstance(cache, StageCache):
            cache.active = layers
        try:
            with self._view(first):
                return self._base_forward(inputs_embeds=self._dummy(h), attention_mask=mask2d,
                                          **self._positions(False, pos), **({"cache": cache} if cache else {}))
        finally:
            for handle in handles:
                handle.remove()
            if isinstance(cache, StageCache):
                cache.active = None

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        """What the family's forward does after its last layer (final norm, projection), for each
        position of ``h`` (..., H)."""
        shape = h.shape
        flat = h.reshape(-1, 1, shape[-1])  # one-token sequences: the post-layer part is per position
        if len(flat) == 0:
            return h
        with self._view(self.num_layers, given=flat):
            out = self._base_forward(inputs_embeds=self._dummy(flat), attention_mask=None,
                                     **self._positions(False, torch.zeros(flat.shape[:2], dtype=torch.long,
                                                                          device=flat.device)))
        return out.reshape(*shape[:-1], out.shape[-1])

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The family's causal-LM head over final-norm outputs ``h`` (..., H): (..., V)."""
        if not self.has_head:
            raise NotImplementedError(f"{type(self.model).__name__} has no language-model head")
        shape = h.shape
        flat = h.reshape(1, -1, shape[-1])
        with _swap(self.model, self.base_name, _Given(flat)):
            out = self.model(inputs_embeds=flat, return_dict=True)
        return out.logits.reshape(*shape[:-1], -1)

    # -- costs ------------------------------------------------------------------------------------------------
    def _numel(self, names: tuple[str, ...], active: bool = False) -> float:
        """Parameters of ``names``; with ``active``, mixture-of-experts weights count only for the experts
        a token is routed to (top-k of n), the router and any shared expert in full."""
        share = 1.0
        if active:
            k = getattr(self.config, "num_experts_per_tok", None)
            n = getattr(self.config, "num_local_experts", None) or getattr(self.config, "num_experts", None)
            share = k / n if k and n else 1.0
        total = 0.0
        for name in names:
            for pname, p in self.model.get_submodule(name).named_parameters():
                routed = ".experts." in f".{pname}" and "shared" not in pname
                total += p.numel() * (share if routed else 1.0)
        return total

    def head_cost(self, task: str) -> float:
        """Cost of the final norm + head in units of one layer, for ``split.partition=balanced``.

        From parameter counts (meta tensors have sizes; a mixture-of-experts layer counts its router and
        the experts one token uses), times 1.25 for scoring: the log-softmax over the vocabulary and the
        loss, measured on SmolLM2 fp32 on CPU (head + loss = 10 layers, weights = 8).
        """
        layer = self._numel((self.layer_module(0),), active=True) or 1.0
        if task not in ("score", "generate") or not self.has_head:
            return 0.0
        # generation applies the head to one position per row and step, like a layer: no loss on top
        return (1.25 if task == "score" else 1.0) * self._numel(self.head_modules) / layer


def make_adapter(model: nn.Module) -> Adapter:
    """The adapter of a supported model; a clear error for anything else."""
    check_supported(model.config, type(model).__name__)
    return Adapter(model)
