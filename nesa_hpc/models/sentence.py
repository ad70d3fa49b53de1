"""What ``SentenceTransformer(folder).encode`` does with a model folder by default, read from the folder's
own sentence-transformers files: ``modules.json`` (the module list: Transformer, Pooling, Normalize),
the Pooling module's ``config.json`` (which pooling), and ``sentence_bert_config.json`` (``max_seq_length``).
``task=embed`` takes these as its defaults (``task.pooling``, ``task.normalize``, ``task.max_seq_length``
left null), so an embedding job equals sentence-transformers on the same folder unless an option says
otherwise.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..errors import ConfigError

__all__ = ["sentence_settings", "embed_settings"]

_POOLING = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "last"}
_UNSUPPORTED = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")
_KNOWN = (".Transformer", ".Pooling", ".Normalize")


def _read(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read this sentence-transformers file ({exc})") from None


def sentence_settings(folder: str | Path) -> dict:
    """``{"pooling", "normalize", "max_seq_length", "other_modules"}`` as far as the folder's
    sentence-transformers files say them ({} for a folder without ``modules.json``); ``other_modules``: the
    module types task=embed does not run (Dense, ...)."""
    folder = Path(folder)
    if not (folder / "modules.json").is_file():
        return {}
    modules = _read(folder / "modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ConfigError(f"{folder / 'modules.json'}: not a list of modules")
    types = [str(m.get("type", "")) for m in modules]
    found: dict = {"normalize": any(t.endswith(".Normalize") for t in types),
                   "other_modules": [t for t in types if not t.endswith(_KNOWN)]}
    for module in modules:
        if str(module.get("type", "")).endswith(".Pooling"):
            config = _read(folder / str(module.get("path", "")) / "config.json")
            modes = [_POOLING[k] for k in _POOLING if config.get(k)]
            bad = [k for k in _UNSUPPORTED if config.get(k)]
            if bad or len(modes) != 1:
                raise ConfigError(f"{folder / str(module.get('path', ''))}/config.json: pooling {bad or modes} is not "
                                  "one task.pooling does (mean, cls, last); set task.pooling")
            found["pooling"] = modes[0]
    if (folder / "sentence_bert_config.json").is_file():
        length = _read(folder / "sentence_bert_config.json").get("max_seq_length")
        if isinstance(length, int) and length > 0:
            found["max_seq_length"] = length
    return found


def embed_settings(settings, folder: str | Path):
    """``settings`` with the embedding options left null filled in from the folder (else mean pooling, no
    normalisation, no length below ``data.max_length``); rows are cut at the smaller of ``data.max_length``
    and ``max_seq_length``. Other tasks are returned unchanged."""
    if settings.task != "embed":
        return settings
    st = sentence_settings(folder)
    if st.get("other_modules") and (settings.pooling is None or settings.normalize is None):
        raise ConfigError(f"{Path(folder) / 'modules.json'} lists {st['other_modules']}, which task=embed does not "
                          "run: set task.pooling and task.normalize to embed with the Transformer's pooled output")
    pooling = settings.pooling or st.get("pooling", "mean")
    normalize = settings.normalize if settings.normalize is not None else st.get("normalize", False)
    longest = settings.max_seq_length or st.get("max_seq_length")
    max_length = min(settings.max_length, longest) if longest else settings.max_length
    return replace(settings, pooling=pooling, normalize=normalize, max_seq_length=longest, max_length=max_length)
