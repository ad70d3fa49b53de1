"""What one input row asks for, beyond plain text: a chat (``messages``), a prompt and a completion to score,
or an OpenAI batch request; and how rank 0 turns such a row into text for the tokenizer.

A plain text row stays a ``str`` all the way to the tokenizer. Every other row is a :class:`Request`. The
readers of :mod:`nesa_hpc.io.read` call :meth:`RowFields.extract` on each record (a JSON object, a CSV row or
a Parquet row) and yield its ``str``, :class:`Request` or, for a row that cannot be used,
:class:`~nesa_hpc.io.read.RowError`. :func:`render` then applies the tokenizer's chat template on rank 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

__all__ = ["Request", "RowFields", "render", "OPENAI_URLS", "OPENAI_OPTIONS", "decode_string"]

# the endpoints whose request bodies ``data.format=openai_batch`` reads (embeddings: task=embed; else generate)
OPENAI_URLS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/embeddings": "embeddings"}
# body keys that set a row's decoding, and the task option each one overrides
OPENAI_OPTIONS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                  "temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop"}
# body keys accepted when they ask for nothing beyond one plain completion
_NEUTRAL = {"n": 1, "stream": False, "echo": False, "best_of": 1, "presence_penalty": 0,
            "frequency_penalty": 0, "parallel_tool_calls": None, "stream_options": None}
_IGNORED = ("user", "metadata", "store", "service_tier")  # about the service, not the output


@dataclass(frozen=True)
class Request:
    """One row that is more than a text: exactly one of ``text`` (after :func:`render`), ``messages`` (before),
    or ``prompt`` + ``completion`` is what the model reads."""

    text: str | None = None
    messages: tuple[dict, ...] | None = None   # role/content messages: the tokenizer's chat template
    prompt: str | tuple[dict, ...] | None = None  # continuation scoring: the context (text or messages) ...
    completion: str | None = None                # ... and the continuation whose tokens are scored
    custom_id: str | None = None               # data.format=openai_batch: the request's id ...
    endpoint: str | None = None                # ... its url (/v1/chat/completions or /v1/completions) ...
    options: tuple[tuple[str, object], ...] = ()  # ... its decoding settings (task option, value) ...
    model: str = ""                              # ... and body.model (echoed in the exported response)
    row_id: str | None = None                    # data.id_field: the row's own id, kept in the results
    logprobs: int | None = None                  # body.logprobs: alternatives asked per token (0: the token's own)
    echo: bool = False                           # /v1/completions body.echo: the prompt (and its logprobs) first

    @property
    def is_pair(self) -> bool:
        return self.completion is not None


def decode_string(value: object, name: str, where: str) -> str:
    """``value`` as a string a tokenizer takes (not an unpaired surrogate); DataError-style ValueError else."""
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a \ud800-style escape: not a character, no tokenizer takes it
        raise ValueError(f"{where}: field {name!r} holds an unpaired surrogate ({value[exc.start]!r} at character "
                         f"{exc.start})") from None
    return value


def _messages(value: object, name: str, where: str) -> tuple[dict, ...]:
    """A chat: a non-empty list of {"role": str, "content": str or a list of text parts}."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{where}: field {name!r} must be a non-empty list of role/content messages")
    out = []
    for i, m in enumerate(value):
        at = f"{name}[{i}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: {at} must be an object with 'role' and 'content'")
        content = m["content"]
        if isinstance(content, (list, tuple)):  # OpenAI's content parts: text only
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"{where}: {at}.content holds a {kind!r} part; only text parts are supported")
                parts.append(decode_string(part.get("text"), f"{at}.content.text", where))
            content = "\n".join(parts)  # as vLLM's chat parsing joins a message's text parts
        out.append({"role": decode_string(m["role"], f"{at}.role", where),
                    "content": decode_string(content, f"{at}.content", where)})
    return tuple(out)


@dataclass(frozen=True)
class RowFields:
    """Which fields of a record make a row (``data.text_field``, ``data.messages_field``, ``data.prompt_field``
    / ``data.completion_field``), or ``openai``: each record is an OpenAI batch request line."""

    text_field: str = "text"
    messages_field: str | None = "messages"
    prompt_field: str | None = None
    completion_field: str | None = None
    openai: bool = False
    max_new_tokens: int | None = None  # openai: the most a row may ask for (the model's positions allow)
    id_field: str | None = None        # data.id_field: a field holding the row's id (a string or an integer)
    embed: bool = False                # openai: task=embed reads /v1/embeddings requests (and only those)
    logprobs: int | None = None        # openai: alternatives the job keeps per token (task.top_logprobs), None: none
    prompt_logprobs: bool = True       # openai: the head runs on rank 0, which can score an echoed prompt

    @property
    def pairs(self) -> bool:
        return self.completion_field is not None

    def columns(self) -> list[str]:
        """The columns to read from a table (CSV, Parquet)."""
        ids = [self.id_field] if self.id_field else []
        if self.pairs:
            return [self.prompt_field, self.completion_field, *ids]
        return [self.text_field] + ([self.messages_field] if self.messages_field else []) + ids

    def describe(self) -> str:
        if self.pairs:
            return f"{self.prompt_field!r} and {self.completion_field!r} (data.prompt_field, data.completion_field)"
        extra = f" or {self.messages_field!r} (data.messages_field)" if self.messages_field else ""
        return f"{self.text_field!r} (data.text_field){extra}"

    def extract(self, obj: object, where: str) -> str | Request:
        """The row held by ``obj`` (a record); raises ValueError with a message naming ``where`` and the field.
        With ``id_field`` the row comes as a :class:`Request` carrying its id."""
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        row = self._row(obj, where)
        if not self.id_field or self.openai:
            return row
        rid = obj.get(self.id_field)
        if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
            raise ValueError(f"{where}: field {self.id_field!r} (data.id_field) must be a non-empty string or an "
                             f"integer, got {rid!r}")
        return replace(row, row_id=str(rid)) if isinstance(row, Request) else Request(text=row, row_id=str(rid))

    def _row(self, obj: dict, where: str) -> str | Request:
        if self.openai:
            return self._openai(obj, where)
        if self.pairs:
            for name in (self.prompt_field, self.completion_field):
                if obj.get(name) is None:
                    raise ValueError(f"{where}: missing field {name!r}; the row needs {self.describe()}")
            prompt = obj[self.prompt_field]
            prompt = _messages(prompt, self.prompt_field, where) if isinstance(prompt, (list, tuple)) else \
                decode_string(prompt, self.prompt_field, where)
            return Request(prompt=prompt, completion=decode_string(obj[self.completion_field],
                                                                   self.completion_field, where))
        chat = self.messages_field is not None and obj.get(self.messages_field) is not None
        if self.text_field in obj and not (chat and obj[self.text_field] is None):
            return decode_string(obj[self.text_field], self.text_field, where)
        if chat:
            return Request(messages=_messages(obj[self.messages_field], self.messages_field, where))
        present = sorted(k for k, v in obj.items() if v is not None)
        raise ValueError(f"{where}: missing field {self.describe()}; fields present: {present}")

    def _openai(self, obj: dict, where: str) -> Request:
        custom_id = obj.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise ValueError(f"{where}: an OpenAI batch line needs a non-empty string 'custom_id'")
        where = f"{where} (custom_id {custom_id!r})"
        url = obj.get("url")
        if url not in OPENAI_URLS:
            raise ValueError(f"{where}: url {url!r} is not supported; use one of {sorted(OPENAI_URLS)}")
        if obj.get("method", "POST") != "POST":
            raise ValueError(f"{where}: method {obj.get('method')!r}: batch requests are POST")
        body = obj.get("body")
        if not isinstance(body, dict):
            raise ValueError(f"{where}: 'body' must be a JSON object")
        endpoint = OPENAI_URLS[url]
        if (endpoint == "embeddings") != self.embed:
            raise ValueError(f"{where}: url {url} needs task={'generate' if self.embed else 'embed'}; this job "
                             f"runs task={'embed' if self.embed else 'generate'}")
        if endpoint == "embeddings":
            return _embedding_request(body, custom_id, url, where)
        text_key = "messages" if endpoint == "chat" else "prompt"
        unknown = sorted(set(body) - {text_key, "model", "logprobs", "top_logprobs", *OPENAI_OPTIONS, *_NEUTRAL,
                                      *_IGNORED})
        if unknown:
            raise ValueError(f"{where}: body key(s) {unknown} are not supported (supported: {text_key}, "
                             f"{', '.join(sorted(OPENAI_OPTIONS))}; ignored: {', '.join(_IGNORED)})")
        echo = body.get("echo") if endpoint == "completions" else None
        if echo not in (None, True, False):
            raise ValueError(f"{where}: body.echo={echo!r} must be true or false")
        for key, neutral in _NEUTRAL.items():
            if key == "echo" and endpoint == "completions":
                continue
            if key in body and body[key] not in (neutral, None):
                raise ValueError(f"{where}: body {key}={body[key]!r} is not supported (only {neutral!r})")
        if text_key not in body:
            raise ValueError(f"{where}: body lacks {text_key!r}")
        prompt = body[text_key]
        if endpoint == "completions" and isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]  # a list of one prompt is one prompt; more would be several requests
        if endpoint == "chat":
            messages, text = _messages(prompt, "body.messages", where), None
        else:
            messages, text = None, decode_string(prompt, "body.prompt", where)
            if not text:
                raise ValueError(f"{where}: body.prompt is empty")
        if "max_tokens" in body and "max_completion_tokens" in body:
            raise ValueError(f"{where}: body sets both max_tokens and max_completion_tokens")
        options = {}
        for key, option in OPENAI_OPTIONS.items():
            if body.get(key) is not None:
                options[option] = _option(option, body[key], f"{where}: body.{key}", self.max_new_tokens)
        model = body.get("model") or ""
        if not isinstance(model, str):
            raise ValueError(f"{where}: body.model must be a string, got {type(model).__name__}")
        logprobs = self._logprobs(body, endpoint, where)
        if echo and logprobs is not None and not self.prompt_logprobs:
            raise ValueError(f"{where}: body.echo with body.logprobs scores the prompt where the head runs: run the "
                             "job with split.head=owner")
        return Request(text=text, messages=messages, custom_id=custom_id, endpoint=url,
                       options=tuple(sorted(options.items())), model=model, logprobs=logprobs, echo=bool(echo))

    def _logprobs(self, body: dict, endpoint: str, where: str) -> int | None:
        """The alternatives a request asks per generated token (None: no log-probabilities): chat's
        ``logprobs`` (true/false) with ``top_logprobs`` (0–20), or the legacy completions' ``logprobs`` (0–5).
        The job must keep at least as many (``task.logprobs``, ``task.top_logprobs``)."""
        value, top = body.get("logprobs"), body.get("top_logprobs")
        if endpoint == "chat":
            bad_top = top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20)
            if value not in (None, True, False) or bad_top:
                raise ValueError(f"{where}: body.logprobs must be true or false and body.top_logprobs an integer "
                                 "from 0 to 20")
            if top and not value:
                raise ValueError(f"{where}: body.top_logprobs needs body.logprobs=true")
            asked = (top or 0) if value else None
        else:
            if top is not None:
                raise ValueError(f"{where}: body.top_logprobs is for chat completions; a completion asks with "
                                 "body.logprobs=N")
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 5):
                raise ValueError(f"{where}: body.logprobs={value!r} must be an integer from 0 to 5 (or null)")
            asked = value
        if asked is not None and (self.logprobs is None or asked > self.logprobs):
            raise ValueError(f"{where}: the request asks for log-probabilities with {asked} alternatives; run the job "
                             f"with task.logprobs=true" + (f" task.top_logprobs={asked}" if asked else ""))
        return asked


def _embedding_request(body: dict, custom_id: str, url: str, where: str) -> Request:
    """A ``/v1/embeddings`` body: one input text (a list of one is one input), ``encoding_format`` float."""
    unknown = sorted(set(body) - {"input", "model", "encoding_format", *_IGNORED})
    if unknown:
        raise ValueError(f"{where}: body key(s) {unknown} are not supported for embeddings (supported: input, model, "
                         f"encoding_format=float; ignored: {', '.join(_IGNORED)})")
    if body.get("encoding_format", "float") not in ("float", None):
        raise ValueError(f"{where}: body encoding_format={body['encoding_format']!r} is not supported (only 'float')")
    text = body.get("input")
    if isinstance(text, list) and len(text) == 1:
        text = text[0]  # a list of one input is one input; more would be several requests
    if isinstance(text, list):
        raise ValueError(f"{where}: body.input holds {len(text)} inputs; write one request line per input")
    text = decode_string(text, "body.input", where)
    if not text:
        raise ValueError(f"{where}: body.input is empty")
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise ValueError(f"{where}: body.model must be a string, got {type(model).__name__}")
    return Request(text=text, custom_id=custom_id, endpoint=url, model=model)


def _option(option: str, value: object, where: str, max_new: int | None) -> object:
    """One per-row decoding setting, checked as the task option it overrides."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if option == "max_new_tokens":
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}={value!r} must be an integer >= 1")
        if max_new is not None and value > max_new:
            raise ValueError(f"{where}={value} exceeds the model's positions after data.max_length (at most "
                             f"{max_new})")
        return value
    if option == "temperature":
        if not number or not 0 <= value <= 2 or not math.isfinite(value):
            raise ValueError(f"{where}={value!r} must be a number in [0, 2]")
        return float(value)
    if option == "top_p":
        if not number or not 0 < value <= 1:
            raise ValueError(f"{where}={value!r} must be a number in (0, 1]")
        return float(value)
    if option == "seed":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{where}={value!r} must be an integer >= 0")
        return value
    items = [value] if isinstance(value, str) else value  # stop: a string or a list of up to 4
    if not isinstance(items, list) or not 0 < len(items) <= 4 or not all(isinstance(s, str) and s for s in items):
        raise ValueError(f"{where}={value!r} must be a non-empty string or a list of 1 to 4 of them")
    return tuple(items)


def chat_text(tokenizer, messages, generation_prompt: bool) -> str:
    """``messages`` through the tokenizer's chat template, as text. A template that writes the BOS itself
    (Gemma's ``{{ bos_token }}...``) loses it here when the tokenizer adds one anyway, so that
    ``tokenizer(text)`` gives the ids of ``apply_chat_template(tokenize=True)``, not two BOS tokens."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]
    return text


def render(tokenizer, item, generation_prompt: bool):
    """A :class:`Request` with its messages turned into text by the tokenizer's chat template (a chat to
    score ends as it is; one to reply to, ``generation_prompt``, ends with the assistant's turn opened).
    Plain text and errors pass through; a template that refuses the chat raises ValueError."""
    if not isinstance(item, Request):
        return item
    if item.messages is not None or isinstance(item.prompt, tuple):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the row is a chat (role/content messages) but the tokenizer has no chat template")
        try:
            if item.messages is not None:
                return replace(item, text=chat_text(tokenizer, item.messages, generation_prompt), messages=None)
            return replace(item, prompt=chat_text(tokenizer, item.prompt, True))
        except Exception as exc:  # jinja raises TemplateError (or anything the template's code raises)
            raise ValueError(f"the chat template refused the messages ({exc})") from None
    return item
