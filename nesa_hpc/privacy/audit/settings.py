"""The audit's options (``audit.*`` in conf/audit.yaml), checked."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from ...config import integer, nonneg
from ...errors import ConfigError

__all__ = ["AuditSettings", "audit_settings"]


@dataclass(frozen=True)
class AuditSettings:
    """The checked ``audit.*`` options."""

    ks: tuple[int, ...]
    mechanism: str
    levels: tuple[float | None, ...]  # epsilons (gaussian) or sigmas (sigma); None = privacy off
    delta: float
    clip_percentile: float
    public_path: str | None
    eval_path: str | None
    max_public_rows: int
    max_eval_rows: int
    max_length: int
    batch_size: int
    probe_hidden: int
    probe_epochs: int
    seed: int
    out_dir: str
    inverter_dim: int = 256
    inverter_layers: int = 2
    inverter_epochs: int = 30
    grad_levels: tuple[float, ...] = ()  # epsilons of train.grad_privacy to audit the gradient message at
    owner_alone: tuple[str, ...] = ()  # owner-alone denoiser folders: the baseline a private split has to beat
    shortlist: int = 64  # the model-aware MAP decoder's candidates per position (k > 0)
    model_map_lm: float = 0.0  # its prior: this weight on the LM given the decoded prefix, the rest on the unigram
    particles: int = 8  # the LM-prior particle filter's particles per row (k=0; 0: not run)


def audit_settings(cfg: DictConfig) -> AuditSettings:
    """``audit.*``, checked; the levels start with None (privacy off), then the largest epsilon or sigma first."""
    a = OmegaConf.to_container(cfg.audit, resolve=True)
    mechanism = a.get("mechanism", "gaussian")
    if mechanism not in ("gaussian", "sigma"):
        raise ConfigError(f"audit.mechanism={mechanism!r} must be gaussian or sigma")
    levels = a.get("epsilons") if mechanism == "gaussian" else a.get("sigmas")
    name = "audit.epsilons" if mechanism == "gaussian" else "audit.sigmas"
    if not levels or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in levels):
        raise ConfigError(f"{name} must be a non-empty list of positive numbers (got {levels!r})")
    ks = a.get("ks")
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in ks):
        raise ConfigError(f"audit.ks must be a non-empty list of split points >= 0 (got {ks!r})")
    delta = float(a.get("delta", 1e-5))
    if not 0 < delta < 1:
        raise ConfigError(f"audit.delta={delta} must be in (0, 1)")
    shortlist = integer("audit.shortlist", a.get("shortlist", 64), 1)
    lm = nonneg("audit.model_map_lm", a.get("model_map_lm", 0.0))
    particles = integer("audit.particles", a.get("particles", 8), 0)
    if lm > 1:
        raise ConfigError(f"audit.model_map_lm={lm:g} must be in [0, 1]")
    return AuditSettings(ks=tuple(ks), mechanism=mechanism, levels=(None, *sorted(levels, reverse=True)),
                         delta=delta, clip_percentile=float(a.get("clip_percentile", 90)),
                         public_path=a.get("public_path"), eval_path=a.get("eval_path"),
                         max_public_rows=int(a.get("max_public_rows", 400)),
                         max_eval_rows=int(a.get("max_eval_rows", 64)), max_length=int(a.get("max_length", 64)),
                         batch_size=int(a.get("batch_size", 16)), probe_hidden=int(a.get("probe_hidden", 256)),
                         probe_epochs=int(a.get("probe_epochs", 6)), seed=int(a.get("seed", 0)),
                         out_dir=str(a.get("out_dir", "audit_results")),
                         inverter_dim=int(a.get("inverter_dim", 256)), inverter_layers=int(a.get("inverter_layers", 2)),
                         inverter_epochs=int(a.get("inverter_epochs", 30)),
                         grad_levels=tuple(sorted((float(e) for e in a.get("grad_epsilons") or ()), reverse=True)),
                         owner_alone=tuple(str(p) for p in a.get("owner_alone") or ()), shortlist=shortlist,
                         model_map_lm=lm, particles=particles)
