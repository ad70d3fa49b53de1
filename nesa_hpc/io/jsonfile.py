"""JSON as other tools read it: strict JSON everywhere this project writes it.

Python's ``json`` writes ``Infinity`` and ``NaN`` by default, which are not JSON: JavaScript's
``JSON.parse`` refuses them and ``jq`` turns ``Infinity`` into 1.797e308. Every JSON this project writes
(metrics lines, summaries, reports, JSON inside HDF5 attributes, JSONL exports) goes through :func:`dumps`,
which writes a non-finite number as the string ``"Infinity"``, ``"-Infinity"`` or ``"NaN"`` (the spelling
of the protocol buffers JSON mapping for float fields), so infinity and NaN stay apart and every file
parses with a strict parser. :func:`number` reads such a value back as a float.
"""

from __future__ import annotations

import json
import math

import numpy as np

__all__ = ["dumps", "plain", "number", "NONFINITE"]

NONFINITE = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def plain(x: object) -> object:
    """``x`` with numpy scalars and arrays as Python values, tuples as lists and every non-finite float as
    its string (``"Infinity"``, ``"-Infinity"``, ``"NaN"``)."""
    if isinstance(x, np.ndarray):
        x = x.tolist()
    elif isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        if math.isfinite(x):
            return x
        return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def dumps(x: object, **kwargs) -> str:
    """``json.dumps`` of :func:`plain` ``(x)``; refuses anything that would not be strict JSON."""
    return json.dumps(plain(x), allow_nan=False, **kwargs)


def number(x: object) -> float:
    """A number written by :func:`dumps` (a float, an int or one of the three strings) as a float."""
    return NONFINITE[x] if isinstance(x, str) else float(x)
