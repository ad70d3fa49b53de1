"""Results files out of HDF5: an OpenAI-batch-style output JSONL, or a table (JSONL, CSV, Parquet).

Every export streams the file ``CHUNK`` rows at a time (memory stays bounded whatever its size), writes
rows in input order, and writes to a temporary file in the output's folder that is renamed into place
only when complete, so an interrupted export never leaves a partial file under the output's name.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np

from ..errors import UserError
from . import jsonfile

__all__ = ["ExportError", "EXPORT_FORMATS", "export", "openai_lines", "table_rows"]

EXPORT_FORMATS = ("openai_batch", "jsonl", "csv", "parquet")
CHUNK = 1024  # rows read at a time
_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # finish_reason -> OpenAI's
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class ExportError(UserError):
    """The results file cannot be exported as asked; the message names the file or option."""


def _row_datasets(f: h5py.File) -> list[str]:
    """Per-row datasets (same length as ``row``), ``row`` first; the skipped-row datasets are not rows."""
    n = len(f["row"])
    names = [k for k in f.keys() if isinstance(f[k], h5py.Dataset) and not k.startswith("skipped_")
             and f[k].shape[:1] == (n,)]
    return ["row"] + [k for k in names if k != "row"]


def _value(x):
    """A dataset element as plain Python (JSON-ready)."""
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()  # NaN and infinity stay floats: "NaN" / "Infinity" in JSON, nan / inf in CSV
    return x


def table_rows(f: h5py.File, columns: list[str]) -> Iterator[dict]:
    """The file's rows as dicts of ``columns``, in input order, ``CHUNK`` rows read at a time."""
    n = len(f["row"])
    for start in range(0, n, CHUNK):
        block = {c: f[c][start:start + CHUNK] for c in columns}
        for i in range(min(CHUNK, n - start)):
            yield {c: _value(block[c][i]) for c in columns}


def _skipped(f: h5py.File) -> Iterator[tuple[int, str]]:
    n = len(f["skipped_row"])
    for start in range(0, n, CHUNK):
        rows, reasons = f["skipped_row"][start:start + CHUNK], f["skipped_reason"][start:start + CHUNK]
        for r, why in zip(rows.tolist(), reasons, strict=True):
            yield r, _value(why)


def _custom_ids_of(data_path: str | None, rows: set[int]) -> dict[int, str]:
    """custom_id of the given input rows, read from the OpenAI batch input file when it is still there."""
    found: dict[int, str] = {}
    if not rows or not data_path or not Path(data_path).is_file():
        return found
    last = max(rows)
    with open(data_path, "rb") as fh:
        for i, line in enumerate(fh):
            if i > last:
                break
            if i in rows:
                try:
                    cid = json.loads(line).get("custom_id")
                except (ValueError, AttributeError, RecursionError):
                    continue
                if isinstance(cid, str):
                    found[i] = cid
    return found


def _run_id(f: h5py.File) -> str:
    """The results file's own id (``run_id``, written when the file was created); for a file without one,
    a digest of its path and resume key."""
    run = f.attrs.get("run_id")
    if run is not None:
        return run.decode() if isinstance(run, bytes) else str(run)
    key = f.attrs.get("resume_key", "")
    return hashlib.sha256(f"{Path(f.filename).resolve()}:{key}".encode()).hexdigest()[:32]


def _ids(run: str, row: int) -> dict[str, str]:
    """A row's ids in OpenAI's spelling, unique per results file (a digest of the file's id and the row),
    the same every time the file is exported."""
    h = hashlib.sha256(f"{run}:{row}".encode()).hexdigest()
    return {"line": f"batch_req_{h[:32]}", "request": f"req_{h[32:64]}", "body": h[:29]}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0}}


@dataclass(frozen=True)
class _Facts:
    """What every line of one file's OpenAI export shares."""

    run: str           # the results file's own id
    model: str         # the model folder's name (for requests without body.model)
    created: int
    fingerprint: str
    chat_default: str  # the endpoint of rows that came without one
    top: int = -1      # alternatives per token the file keeps (-1: no log-probabilities)
    tokens: object = None  # the model's tokenizer, to spell the tokens of log-probabilities


def _response_body(rec: dict, ids: dict, facts: _Facts, embed: bool) -> dict:
    """The body of a 200 response: an embeddings list, a chat completion or a text completion."""
    model = rec.get("request_model") or facts.model
    if embed:
        return {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": rec["embedding"]}],
                "model": model, "usage": {"prompt_tokens": rec["n_tokens"], "total_tokens": rec["n_tokens"]}}
    finish = _FINISH.get(rec["finish_reason"], rec["finish_reason"])
    chat = (rec.get("endpoint") or facts.chat_default) == "/v1/chat/completions"
    logprobs = _logprobs(rec, facts, chat)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": rec["generated_text"], "refusal": None},
                  "logprobs": logprobs, "finish_reason": finish}
        body = {"id": f"chatcmpl-{ids['body']}", "object": "chat.completion"}
    else:
        choice = {"text": (rec.get("echo_prompt") or "") + rec["generated_text"], "index": 0, "logprobs": logprobs,
                  "finish_reason": finish}
        body = {"id": f"cmpl-{ids['body']}", "object": "text_completion"}
    body.update(created=facts.created, model=model, choices=[choice],
                usage=_usage(rec["n_prompt_tokens"], rec["n_generated"]), system_fingerprint=facts.fingerprint)
    return body


def _logprobs(rec: dict, facts: _Facts, chat: bool) -> dict | None:
    """``choices[0].logprobs`` in OpenAI's shape for the alternatives the request asked (all the file keeps
    for a file not read from requests; null when none): chat's ``{"content": [{token, logprob, bytes,
    top_logprobs}], "refusal"}``, or the completions' ``{tokens, token_logprobs, top_logprobs,
    text_offset}`` (offsets from the start of the generated text)."""
    n = rec.get("request_logprobs", facts.top)
    if facts.top < 0 or n is None or n < 0:
        return None
    spell = [facts.tokens.decode([t]) for t in rec["generated_ids"]]
    top_ids = np.reshape(rec.get("generated_top_logprob_ids") or [], (len(spell), -1))[:, :n] if n else None
    top_lps = np.reshape(rec.get("generated_top_logprobs") or [], (len(spell), -1))[:, :n] if n else None
    alternatives = [[(facts.tokens.decode([int(t)]), float(v)) for t, v in zip(top_ids[i], top_lps[i], strict=True)]
                    if n else [] for i in range(len(spell))]
    if chat:
        return {"content": [{"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8")),
                             "top_logprobs": [{"token": a, "logprob": v, "bytes": list(a.encode("utf-8"))}
                                              for a, v in alts]}
                            for tok, lp, alts in zip(spell, rec["generated_logprobs"], alternatives, strict=True)],
                "refusal": None}
    token_logprobs, tops = list(rec["generated_logprobs"]), [dict(alts) for alts in alternatives]
    prompt = rec.get("prompt_ids") or []
    if prompt:  # echo: the prompt's tokens first, the first of them without a log-probability (null)
        spelled = [facts.tokens.decode([int(t)]) for t in prompt]
        k = len(prompt) - 1
        p_ids = np.reshape(rec.get("prompt_top_logprob_ids") or [], (k, -1))[:, :n] if n else None
        p_lps = np.reshape(rec.get("prompt_top_logprobs") or [], (k, -1))[:, :n] if n else None
        spell = spelled + spell
        token_logprobs = [None, *rec["prompt_logprobs"]] + token_logprobs
        tops = [None, *({facts.tokens.decode([int(t)]): float(v) for t, v in zip(p_ids[i], p_lps[i], strict=True)}
                        if n else {} for i in range(k))] + tops
    offsets = np.cumsum([0] + [len(t) for t in spell[:-1]]).tolist() if spell else []
    return {"tokens": spell, "token_logprobs": token_logprobs, "top_logprobs": tops if n else None,
            "text_offset": offsets}


def _tokenizer(f: h5py.File):
    """The tokenizer of the file's model (``model_path``), to spell tokens in an export."""
    from transformers import AutoTokenizer

    path = f.attrs.get("model_path")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{f.filename}: the log-probabilities' tokens need the model's tokenizer at model_path "
                          f"{path} ({exc})") from None


def openai_lines(f: h5py.File) -> Iterator[dict]:
    """One OpenAI batch output line per input row of a ``task=generate`` or ``task=embed`` file, in input
    order, in the shape OpenAI writes: a response (status 200) for an answered row, a response with status
    400 and the error in its body for a skipped one (``error`` stays null: it is for requests that got no
    HTTP response)."""
    task = f.attrs.get("task")
    if task not in ("generate", "embed"):
        raise ExportError(f"{f.filename}: --format openai_batch needs a task=generate or task=embed file, not "
                          f"task={task}")
    folder_model = Path(str(f.attrs.get("model_path", "model"))).name
    facts = _Facts(_run_id(f), folder_model, int(os.path.getmtime(f.filename)),
                   "fp_" + hashlib.sha256(f"{folder_model}:{f.attrs.get('model_dtype', '')}".encode()).hexdigest()[:10],
                   "/v1/chat/completions" if f.attrs.get("chat_template") in (True, "true") else "/v1/completions")
    if "generated_logprobs" in f:
        facts = replace(facts, top=int(f.attrs.get("top_logprobs", 0)), tokens=_tokenizer(f))
    has_ids, embed = "custom_id" in f, task == "embed"
    columns = (["row", "embedding", "n_tokens"] if embed else
               ["row", "generated_text", "finish_reason", "n_prompt_tokens", "n_generated"]) + \
        (["custom_id", "endpoint"] if has_ids else []) + (["request_model"] if "request_model" in f else []) + \
        (["id"] if "id" in f and not has_ids else []) + \
        [c for c in ("generated_ids", "generated_logprobs", "generated_top_logprob_ids", "generated_top_logprobs",
                     "request_logprobs", "echo_prompt", "prompt_ids", "prompt_logprobs", "prompt_top_logprob_ids",
                     "prompt_top_logprobs") if c in f and not embed]
    skipped = dict(_skipped(f))
    skipped_ids = _custom_ids_of(f.attrs.get("data_path"), set(skipped)) if has_ids else {}
    pending = iter(sorted(skipped.items()))
    nxt = next(pending, None)

    def error_line(row: int, reason: str) -> dict:
        ids = _ids(facts.run, row)
        error = {"message": reason, "type": "invalid_request_error", "param": None, "code": None}
        return {"id": ids["line"], "custom_id": skipped_ids.get(row) if has_ids else str(row),
                "response": {"status_code": 400, "request_id": ids["request"], "body": {"error": error}},
                "error": None}

    for rec in table_rows(f, columns):
        row = rec["row"]
        while nxt is not None and nxt[0] < row:
            yield error_line(*nxt)
            nxt = next(pending, None)
        ids = _ids(facts.run, row)
        yield {"id": ids["line"], "custom_id": rec["custom_id"] if has_ids else rec.get("id") or str(row),
               "response": {"status_code": 200, "request_id": ids["request"],
                            "body": _response_body(rec, ids, facts, embed)}, "error": None}
    while nxt is not None:
        yield error_line(*nxt)
        nxt = next(pending, None)


def _format_of(output: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in EXPORT_FORMATS:
            raise ExportError(f"--format {fmt!r} must be one of {EXPORT_FORMATS}")
        return fmt
    suffix = output.suffix.lower()
    if suffix not in _EXTENSIONS:
        raise ExportError(f"{output}: cannot tell the format from the extension {suffix!r}; pass --format, one "
                          f"of {EXPORT_FORMATS}")
    return _EXTENSIONS[suffix]


def _write_jsonl(items: Iterator[dict], fh) -> int:
    n = 0
    for item in items:
        fh.write(jsonfile.dumps(item, ensure_ascii=False) + "\n")
        n += 1
    return n


def _write_csv(items: Iterator[dict], columns: list[str], fh) -> int:
    writer = csv.writer(fh)
    writer.writerow(columns)
    n = 0
    for item in items:
        writer.writerow([jsonfile.dumps(v) if isinstance(v, list) else ("" if v is None else v)
                         for v in (item[c] for c in columns)])
        n += 1
    return n


def _write_parquet(f: h5py.File, columns: list[str], path: str) -> int:
    """The table with a schema taken from the datasets' types (not from the values, so the tables of two
    jobs concatenate) and the results file's attributes as JSON in the schema's metadata
    (``nesa_hpc.attrs``: model, task, settings, privacy ledger, widths such as ``top_logprobs``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(c, _arrow_type(f[c])) for c in columns], metadata={"nesa_hpc.attrs": _attrs_json(f)})
    n = 0
    with pq.ParquetWriter(path, schema) as writer:
        batch: dict[str, list] = {c: [] for c in columns}
        for item in table_rows(f, columns):
            for c in columns:
                batch[c].append(item[c])
            n += 1
            if len(batch["row"]) == CHUNK:
                writer.write_table(pa.table(batch, schema=schema))
                batch = {c: [] for c in columns}
        writer.write_table(pa.table(batch, schema=schema))
    return n


def _attrs_json(f: h5py.File) -> str:
    """The results file's attributes as one strict-JSON object (JSON-valued attributes parsed)."""
    out = {}
    for key, value in f.attrs.items():
        value = _value(value) if isinstance(value, (bytes, np.generic, np.ndarray)) else value
        if isinstance(value, str) and value[:1] in "[{":
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key] = value
    return jsonfile.dumps(out)


def _arrow_type(ds: h5py.Dataset):
    import pyarrow as pa

    if h5py.check_string_dtype(ds.dtype) is not None:
        return pa.string()
    base = h5py.check_vlen_dtype(ds.dtype)
    if base is not None:
        return pa.list_(pa.from_numpy_dtype(base))
    if ds.ndim > 1:
        return pa.list_(pa.from_numpy_dtype(ds.dtype))
    return pa.from_numpy_dtype(ds.dtype)


def export(results: str | Path, output: str | Path, fmt: str | None = None, columns: list[str] | None = None,
           overwrite: bool = False, allow_incomplete: bool = False, errors: str | Path | None = None) -> dict:
    """Write ``results`` (an HDF5 results file) to ``output`` as ``fmt`` (default: from the extension); with
    ``errors`` (``openai_batch`` only) the lines of refused requests go there instead, as OpenAI splits a
    batch's output and error files. Returns {"format", "rows" (lines or table rows written), "output",
    "errors" (lines written to ``errors``)}."""
    results, output = Path(results), Path(output)
    fmt = _format_of(output, "openai_batch" if errors is not None and fmt is None else fmt)
    if errors is not None and fmt != "openai_batch":
        raise ExportError(f"--errors {errors}: only --format openai_batch writes an error file")
    if not results.is_file():
        raise ExportError(f"{results}: no such results file")
    for path in (output, *([Path(errors)] if errors is not None else [])):
        if path.exists() and not overwrite:
            raise ExportError(f"{path} already exists; pass --overwrite to replace it")
        if not path.parent.is_dir():
            raise ExportError(f"{path}: folder {path.parent} does not exist")
    try:
        f = h5py.File(results, "r")
    except OSError as exc:
        raise ExportError(f"{results}: not a readable HDF5 file ({exc})") from None
    with f:
        if "row" not in f or "skipped_row" not in f:
            raise ExportError(f"{results}: not a nesa_hpc results file (no `row` / `skipped_row` datasets)")
        if not f.attrs.get("complete", False) and not allow_incomplete:
            raise ExportError(f"{results} is not complete (a job still running, stopped or failed): resume it "
                              "first, or pass --allow-incomplete to export the rows committed so far")
        available = _row_datasets(f)
        if columns:
            unknown = [c for c in columns if c not in available]
            if unknown:
                raise ExportError(f"--columns {unknown} are not per-row datasets of {results}; it has {available}")
            columns = ["row"] + [c for c in columns if c != "row"]
        else:
            columns = [c for c in available if c != "row_digest"]  # bookkeeping of resume (--columns names it)
        tmp, tmp_errors = _part(output), _part(Path(errors)) if errors is not None else None
        n_errors = 0
        try:
            if fmt == "parquet":
                n = _write_parquet(f, columns, tmp)
            else:
                with open(tmp, "w", encoding="utf-8", newline="") as fh:
                    if fmt == "openai_batch" and tmp_errors is not None:
                        with open(tmp_errors, "w", encoding="utf-8") as fe:
                            n, n_errors = _write_split(openai_lines(f), fh, fe)
                    elif fmt == "openai_batch":
                        n = _write_jsonl(openai_lines(f), fh)
                    elif fmt == "jsonl":
                        n = _write_jsonl(table_rows(f, columns), fh)
                    else:
                        n = _write_csv(table_rows(f, columns), columns, fh)
            if tmp_errors is not None:
                os.replace(tmp_errors, errors)
            os.replace(tmp, output)
        except BaseException:
            for part in (tmp, tmp_errors):
                if part is not None:
                    Path(part).unlink(missing_ok=True)
            raise
    return {"format": fmt, "rows": n, "output": str(output), "errors": n_errors}


def _part(path: Path) -> str:
    """A temporary file beside ``path``, renamed into place once the export is complete."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    return tmp


def _write_split(lines: Iterator[dict], out, err) -> tuple[int, int]:
    """OpenAI batch lines: answered requests to ``out``, refused ones (status other than 200) to ``err``."""
    n = n_err = 0
    for line in lines:
        ok = line["response"] is not None and line["response"]["status_code"] == 200
        (out if ok else err).write(jsonfile.dumps(line, ensure_ascii=False) + "\n")
        n, n_err = n + ok, n_err + (not ok)
    return n, n_err
