"""Read this project's JSON files as a strict parser does (JavaScript's ``JSON.parse``, ``jq``): a bare
``NaN``, ``Infinity`` or ``-Infinity`` is refused, so every test that reads one of our files checks it."""

from __future__ import annotations

import json


def _refuse(name: str):
    raise ValueError(f"{name} is not JSON")


def loads(text: str):
    return json.loads(text, parse_constant=_refuse)


def lines(text: str) -> list:
    return [loads(line) for line in text.splitlines() if line.strip()]
