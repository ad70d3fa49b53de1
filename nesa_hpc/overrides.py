"""The command line's Hydra overrides, checked before Hydra composes the job's config.

Hydra itself answers a typo'd key (``data.pth=rows.jsonl``) with a multi-line dump, exit status 1 and a
hint to write ``+data.pth=...``, which then runs the job on the default data with exit 0. Here every
override must name a key of the config schema (the entry script's config with the chosen config groups),
``+key`` and ``++key`` included; a bad key, an unknown config group option or a value of the wrong type
ends the job with one line naming the override (and the nearest valid key or option) and exit status 2,
printed by rank 0 only. Hydra's own flags (``--help``, ``--cfg``, ...) and ``hydra.*`` keys pass through.
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path

__all__ = ["check_overrides", "OverrideError", "schema_keys"]

CONF = Path(__file__).resolve().parents[1] / "conf"
_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")


class OverrideError(ValueError):
    """A command-line override the config does not take; the message names it."""


def schema_keys(cfg) -> set[str]:
    """Every dotted key of ``cfg`` (nodes and leaves), without Hydra's own."""
    from omegaconf import OmegaConf

    keys: set[str] = set()

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            keys.add(f"{prefix}{key}")
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return {k for k in keys if k != "hydra" and not k.startswith("hydra.")}


def _nearest(word: str, choices) -> str:
    near = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.5)
    return f" (did you mean {near[0]}?)" if near else ""


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def validate(config_name: str, args: list[str], conf: Path = CONF) -> None:
    """Raise :class:`OverrideError` for the first override of ``args`` that ``config_name`` does not take."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except HydraException as exc:
        raise OverrideError(f"cannot parse the overrides: {_first_line(exc)}") from None
    groups = {p.name for p in conf.iterdir() if p.is_dir()}
    chosen, others = [], []
    for arg, o in zip(args, parsed, strict=True):
        key = o.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")) or o.is_delete():
            continue
        if key in groups and not o.is_add() and not o.is_force_add():
            options = sorted(p.stem for p in (conf / key).glob("*.yaml"))
            value = o.value()
            if not isinstance(value, str) or value not in options:
                raise OverrideError(f"{arg}: {key} must be one of {options}{_nearest(str(value), options)}")
            chosen.append(arg)
        else:
            others.append((arg, key))
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        try:
            keys = schema_keys(compose(config_name=config_name, overrides=chosen))
        except (HydraException, OmegaConfBaseException) as exc:
            raise OverrideError(f"{' '.join(chosen)}: {_first_line(exc)}") from None
        for arg, key in others:
            if key not in keys:
                raise OverrideError(f"{arg}: {key} is not a config key{_nearest(key, keys)}")
        try:
            compose(config_name=config_name, overrides=args)
        except (HydraException, OmegaConfBaseException) as exc:
            raise OverrideError(f"{_first_line(exc)}") from None


def check_overrides(config_name: str, argv: list[str] | None = None) -> None:
    """The entry scripts' first check: exit 2 with one line (rank 0's) for a bad override. Arguments that
    start with ``-`` are Hydra's own flags: the command line is then left to Hydra."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a.startswith("-") for a in args):
        return
    try:
        validate(config_name, args)
    except OverrideError as exc:
        rank = next((os.environ[v] for v in _RANK_VARS if v in os.environ), "0")
        if rank == "0":
            print(f"nesa_hpc: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
