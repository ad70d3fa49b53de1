"""One small adapter per model family: how to embed, run one layer, normalise and apply the head.

Every adapter wraps a transformers model built on the meta device (see :mod:`nesa_hpc.weights`) and
reuses the library's own decoder/encoder layers; only the modules a rank needs are ever filled in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import (
    create_bidirectional_mask,
    create_causal_mask,
    create_sliding_window_causal_mask,
)

from .errors import ConfigError

__all__ = ["Adapter", "LlamaLikeAdapter", "GPT2Adapter", "BertAdapter", "make_adapter", "ENCODER_MODEL_TYPES"]

# Families loaded as bare encoders (``AutoModel``): their output is ``last_hidden_state``; no LM head.
ENCODER_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "electra"})


@dataclass
class StageContext:
    """What every layer of one stage needs besides the hidden states; rebuilt on each rank."""

    mask: torch.Tensor | None | dict
    position_ids: torch.Tensor
    extra: dict


class Adapter:
    """Family-independent view of a model: ``embed`` -> ``layer(i)`` ... -> ``norm`` -> ``logits``."""

    has_head: bool = True

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # -- names of the modules each role needs (used to load only those tensors) --
    embed_modules: tuple[str, ...] = ()
    norm_modules: tuple[str, ...] = ()
    head_modules: tuple[str, ...] = ()
    # modules every stage that runs layers needs (shared helpers such as rotary embeddings)
    stage_modules: tuple[str, ...] = ()
    # checkpoint names a tied parameter can be read from when the file omits it
    tied: dict[str, str] = {}

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def layer_module(self, i: int) -> str:
        raise NotImplementedError

    def embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def context(self, h: torch.Tensor, mask2d: torch.Tensor, pos: torch.Tensor, cache=None,
                first: int = 0) -> StageContext:
        """Masks and position embeddings for a block of layers starting at layer ``first``. With a KV
        ``cache`` (generation), ``h`` holds only the new positions and ``mask2d`` (B, past + T) covers the
        cached ones too; the cache's layer ``first`` tells how many positions are cached."""
        raise NotImplementedError

    def layer(self, i: int, h: torch.Tensor, ctx: StageContext) -> torch.Tensor:
        raise NotImplementedError

    def run_layers(self, layers: range, h: torch.Tensor, mask2d: torch.Tensor,
                   pos: torch.Tensor, cache=None) -> torch.Tensor:
        """Run ``layers`` (original indices) over ``h`` (B, T, H); returns (B, T, H). With ``cache`` (a
        transformers ``Cache`` indexed by original layer index) the layers read and extend their KV cache."""
        if len(layers) == 0:
            return h
        ctx = self.context(h, mask2d, pos, cache, layers[0])
        for i in layers:
            h = self.layer(i, h, ctx)
        return h

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self.model).__name__} has no language-model head")

    def _numel(self, names: tuple[str, ...]) -> int:
        return sum(p.numel() for n in names for p in self.model.get_submodule(n).parameters())

    def head_cost(self, task: str) -> float:
        """Cost of the final norm + head in units of one layer, for ``split.partition=balanced``.

        From parameter counts (meta tensors have sizes), times 1.25 for scoring: the log-softmax over the
        vocabulary and the loss, measured on SmolLM2 fp32 on CPU (head + loss = 10 layers, weights = 8).
        """
        layer = self._numel((self.layer_module(0),)) or 1
        if task not in ("score", "generate") or not self.has_head:
            return self._numel(self.norm_modules) / layer
        # generation applies the head to one position per row and step, like a layer: no loss on top
        return (1.25 if task == "score" else 1.0) * self._numel(self.head_modules) / layer


class LlamaLikeAdapter(Adapter):
    """``model.embed_tokens / model.layers / model.norm / model.rotary_emb / lm_head`` (Llama, Mistral,
    Qwen2, SmolLM, ...)."""

    embed_modules = ("model.embed_tokens",)
    norm_modules = ("model.norm",)
    head_modules = ("lm_head",)
    stage_modules = ("model.rotary_emb",)
    tied = {"lm_head.weight": "model.embed_tokens.weight"}

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def layer_module(self, i: int) -> str:
        return f"model.layers.{i}"

    def embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(ids)  # (B, T, H)

    def context(self, h, mask2d, pos, cache=None, first=0) -> StageContext:
        kwargs = dict(config=self.config, inputs_embeds=h, attention_mask=mask2d, cache=cache, position_ids=pos)
        layer_types = getattr(self.config, "layer_types", None) or []
        if cache is None:
            masks = {"full_attention": create_causal_mask(**kwargs)}
            if "sliding_attention" in layer_types:
                masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        else:
            # size each mask against a layer of its type in this stage (the cache holds this stage's layers only)
            masks = {}
            for kind, make in (("full_attention", create_causal_mask),
                               ("sliding_attention", create_sliding_window_causal_mask)):
                idx = next((i for i in range(first, len(self.layers)) if (layer_types[i] if layer_types
                                                                           else "full_attention") == kind), None)
                if idx is not None:
                    masks[kind] = make(**kwargs, layer_idx=idx)
        rotary = self.model.model.rotary_emb(h, position_ids=pos)  # (cos, sin), each (B, T, head_dim)
        return StageContext(masks, pos, {"position_embeddings": rotary, "layer_types": layer_types, "cache": cache})

    def layer(self, i: int, h: torch.Tensor, ctx: StageContext) -> torch.Tensor:
        types = ctx.extra["layer_types"]
        mask = ctx.mask[types[i]] if types else ctx.mask["full_attention"]
        kw = {"cache": ctx.extra["cache"], "use_cache": True} if ctx.extra["cache"] is not None else {}
        return self.layers[i](h, attention_mask=mask, position_ids=ctx.position_ids,
                              position_embeddings=ctx.extra["position_embeddings"], **kw)

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.model.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(h)


class GPT2Adapter(Adapter):
    """``transformer.wte / wpe / h / ln_f`` + ``lm_head`` (GPT-2)."""

    embed_modules = ("transformer.wte", "transformer.wpe")
    norm_modules = ("transformer.ln_f",)
    head_modules = ("lm_head",)
    tied = {"lm_head.weight": "transformer.wte.weight"}

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.transformer.h

    def layer_module(self, i: int) -> str:
        return f"transformer.h.{i}"

    def embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        t = self.model.transformer
        return t.wte(ids) + t.wpe(pos)  # (B, T, H)

    def context(self, h, mask2d, pos, cache=None, first=0) -> StageContext:
        extra = {} if cache is None else {"layer_idx": first}
        mask = create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=mask2d, cache=cache,
                                  position_ids=pos, **extra)
        return StageContext(mask, pos, {"cache": cache})

    def layer(self, i: int, h: torch.Tensor, ctx: StageContext) -> torch.Tensor:
        cache = ctx.extra["cache"]
        kw = {"use_cache": True} if cache is not None else {}
        return self.layers[i](h, cache, ctx.mask, position_ids=ctx.position_ids, **kw)

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.transformer.ln_f(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(h)


class BertAdapter(Adapter):
    """BERT-style bidirectional encoders loaded with ``AutoModel`` (``embeddings / encoder.layer``)."""

    has_head = False
    embed_modules = ("embeddings",)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layer

    def layer_module(self, i: int) -> str:
        return f"encoder.layer.{i}"

    def embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model.embeddings(input_ids=ids, position_ids=pos)  # (B, T, H)

    def context(self, h, mask2d, pos, cache=None, first=0) -> StageContext:
        return StageContext(create_bidirectional_mask(config=self.config, inputs_embeds=h, attention_mask=mask2d),
                            pos, {})

    def layer(self, i: int, h: torch.Tensor, ctx: StageContext) -> torch.Tensor:
        return self.layers[i](h, ctx.mask)


def make_adapter(model: nn.Module) -> Adapter:
    """Pick the adapter that matches the model's module structure; raise a clear error otherwise."""
    inner = getattr(model, "model", None)
    if inner is not None and all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")) \
            and hasattr(model, "lm_head"):
        return LlamaLikeAdapter(model)
    t = getattr(model, "transformer", None)
    if t is not None and all(hasattr(t, a) for a in ("wte", "wpe", "h", "ln_f")):
        return GPT2Adapter(model)
    if hasattr(model, "embeddings") and hasattr(getattr(model, "encoder", None), "layer"):
        return BertAdapter(model)
    raise ConfigError(
        f"unsupported model architecture {type(model).__name__} (model_type="
        f"{getattr(model.config, 'model_type', '?')!r}): nesa_hpc supports Llama-like decoders "
        "(model.embed_tokens/layers/norm/rotary_emb + lm_head), GPT-2 and BERT-style encoders")
