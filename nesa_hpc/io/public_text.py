"""Public text that ships with every Python: paragraphs of standard-library docstrings.

Used where nesa_hpc needs text that is certainly not the user's private data: estimating the clip norm
for ``privacy.clip=auto`` and training / evaluating the attacks of the privacy audit. The paragraphs
are plain English prose about programming, so they differ in style from most datasets; pass your own
public text (``privacy.calibration_path``, ``audit.public_path``) when you have a closer one.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from pathlib import Path

__all__ = ["public_texts", "load_texts"]

_MODULES = ("argparse", "bisect", "calendar", "collections", "csv", "datetime", "decimal", "difflib",
            "email.message", "fractions", "functools", "heapq", "http.client", "json", "logging", "pathlib",
            "queue", "random", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile",
            "textwrap", "threading", "unittest", "urllib.request", "zipfile")


@functools.lru_cache(maxsize=1)
def _paragraphs() -> tuple[str, ...]:
    out: list[str] = []
    seen: set[str] = set()
    for name in _MODULES:
        module = importlib.import_module(name)
        objects = [module] + [obj for _, obj in inspect.getmembers(module)
                              if (inspect.isclass(obj) or inspect.isfunction(obj))
                              and getattr(obj, "__module__", "") == module.__name__]
        for obj in objects:
            for para in re.split(r"\n\s*\n", inspect.getdoc(obj) or ""):
                para = " ".join(para.split())
                prose = sum(c.isalpha() or c == " " for c in para) / max(1, len(para))
                if 40 <= len(para) <= 400 and prose > 0.9 and ">>>" not in para and para not in seen:
                    seen.add(para)
                    out.append(para)
    return tuple(out)


def public_texts(limit: int | None = None) -> list[str]:
    """Prose paragraphs (40-400 characters) from docstrings of a fixed list of standard-library modules,
    in a fixed order."""
    paras = list(_paragraphs())
    return paras[:limit] if limit else paras


def load_texts(path: str | Path | None, limit: int | None = None) -> list[str]:
    """Texts of a data file (any format ``data.format=auto`` reads), or the built-in public text."""
    if path is None:
        return public_texts(limit)
    from .read import read_rows

    texts = [t for _, t in read_rows(path)]
    return texts[:limit] if limit else texts
