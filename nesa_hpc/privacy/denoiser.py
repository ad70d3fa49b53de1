"""The owner-side denoiser: a small network on rank 0 between the workers' answer and the head.

What comes back from the workers is a function of the privatised Z they were sent, so anything an
attacker with the public weights could compute from it. Rank 0 alone also holds the clean states at layer
k (the token embeddings at k=0). The denoiser combines both, position by position::

    x = gate * r                    r: (B, T, H) final states from the workers (after the owner tail)
    x = x + W2 act(W1 [n(x); n(c)])   once per block; c: (B, T, H) rank 0's clean states at layer k
    -> final norm -> head

``n`` is an RMS norm with its own weights, ``W2`` starts at zero and ``gate`` at one, so an untrained
denoiser passes ``r`` through unchanged. It works per position: whatever context it uses comes from the
workers' answer (and from rank 0's own layers when k > 0), never from other positions of ``c``.

``alone=True`` is the *owner-alone* model: the same network with the workers' answer left out
(``x`` starts at zero), i.e. what rank 0 can compute without sending anything. It is the baseline a
private split has to beat (``docs/denoiser.md``).

The weights are trained on rank 0 by ``jobs/train.py`` (``train.denoiser.*``), written to
``train.owner_dir/denoiser/`` and used by inference with ``split.denoiser=PATH``; they never leave rank 0.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..io import jsonfile

__all__ = ["Denoiser", "save_denoiser", "load_denoiser", "owner_denoiser", "FILE", "META"]

log = logging.getLogger("nesa_hpc")

FILE = "denoiser.safetensors"
META = "denoiser.json"
FORMAT = "nesa_hpc-denoiser/1"


class Denoiser(nn.Module):
    """``blocks`` residual MLP blocks of width ``width`` over (workers' states, clean layer-k states)."""

    def __init__(self, hidden: int, blocks: int, width: int, k: int, alone: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        self.hidden, self.blocks, self.width, self.k, self.alone = hidden, blocks, width, k, alone
        self.gate = nn.Parameter(torch.ones(hidden))
        self.norm_x = nn.ModuleList(nn.RMSNorm(hidden, eps=eps) for _ in range(blocks))
        self.norm_c = nn.ModuleList(nn.RMSNorm(hidden, eps=eps) for _ in range(blocks))
        self.up = nn.ModuleList(nn.Linear(2 * hidden, width) for _ in range(blocks))
        self.down = nn.ModuleList(nn.Linear(width, hidden) for _ in range(blocks))
        for d in self.down:
            nn.init.zeros_(d.weight)
            nn.init.zeros_(d.bias)

    def forward(self, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(B, T, H) workers' final states and (B, T, H) clean layer-k states -> (B, T, H) states for the head."""
        dtype = r.dtype
        p = self.gate
        r, c = r.to(p.dtype), c.to(p.dtype)
        x = torch.zeros_like(r) if self.alone else r * self.gate
        for nx, nc, up, down in zip(self.norm_x, self.norm_c, self.up, self.down, strict=True):
            x = x + down(nn.functional.gelu(up(torch.cat([nx(x), nc(c)], dim=-1))))
        return x.to(dtype)

    def check_noise(self, sigma: float | None) -> None:
        """Warn when the job's noise differs from the noise the denoiser was trained with."""
        trained = getattr(self, "trained", {}).get("privacy_sigma")
        ours = float(sigma or 0.0)
        if trained is not None and abs(float(trained) - ours) > 1e-6 * max(1.0, ours):
            log.warning("split.denoiser=%s was trained with noise sigma %.4g; this job adds sigma %.4g (it works "
                        "best at the noise it was trained with)", getattr(self, "path", "?"), float(trained), ours)

    def meta(self) -> dict:
        return {"format": FORMAT, "hidden_size": self.hidden, "blocks": self.blocks, "width": self.width,
                "k": self.k, "alone": self.alone}


def _model_facts(config) -> dict:
    return {"model_type": config.model_type, "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size, "vocab_size": config.vocab_size}


def save_denoiser(denoiser: Denoiser, folder: Path, model_config, trained: dict) -> Path:
    """Write ``denoiser.safetensors`` and ``denoiser.json`` (shape, split point, model, how it was trained)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    save_file({n: p.detach().cpu().contiguous() for n, p in denoiser.state_dict().items()}, str(folder / FILE))
    meta = {**denoiser.meta(), "model": _model_facts(model_config), "trained": trained}
    (folder / META).write_text(jsonfile.dumps(meta, indent=2, default=str))
    return folder


def load_denoiser(path: str, model_config, k: int) -> Denoiser:
    """The denoiser in folder ``path`` (``split.denoiser``), checked against the model and ``split.k``."""
    from safetensors.torch import load_file

    folder = Path(path).expanduser()
    if not (folder / META).is_file() or not (folder / FILE).is_file():
        raise FileNotFoundError(f"split.denoiser={path}: expected a folder with {META} and {FILE} (written by "
                                "jobs/train.py with train.denoiser.blocks > 0, in train.owner_dir/denoiser)")
    meta = json.loads((folder / META).read_text())
    if meta.get("format") != FORMAT:
        raise ConfigError(f"split.denoiser={path}: {META} is not a {FORMAT} file")
    facts = _model_facts(model_config)
    diff = [f"{key} {meta['model'].get(key)} (denoiser) vs {value} (model)" for key, value in facts.items()
            if meta["model"].get(key) != value]
    if diff:
        raise ConfigError(f"split.denoiser={path} was trained for another model: {'; '.join(diff)}")
    if meta["k"] != k:
        raise ConfigError(f"split.denoiser={path} was trained at split.k={meta['k']}; this job has split.k={k} "
                          "(it reads rank 0's clean states at layer k)")
    d = Denoiser(meta["hidden_size"], meta["blocks"], meta["width"], meta["k"], bool(meta["alone"]))
    d.load_state_dict(load_file(str(folder / FILE)))
    d.requires_grad_(False)
    d.path, d.trained = str(path), meta.get("trained") or {}
    if d.alone:
        log.warning("split.denoiser=%s is an owner-alone model (train.denoiser.alone=true): it ignores the workers' "
                    "answer", path)
    return d


def owner_denoiser(settings, adapter, topo, device) -> Denoiser | None:
    """Rank 0: the denoiser of ``split.denoiser`` on the owner's device, or None."""
    if settings.denoiser is None:
        return None
    d = load_denoiser(settings.denoiser, adapter.config, topo.k).to(device)
    log.info("split.denoiser=%s: %d blocks of width %d on rank 0 (%s)", settings.denoiser, d.blocks, d.width,
             "owner-alone: the workers' answer is not used" if d.alone else "workers' answer + clean layer-k states")
    return d
