"""Validated settings built from the Hydra config that every rank composes identically."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from .engine.topology import HEAD_PLACEMENTS, PARTITIONS
from .errors import ConfigError
from .infer.tasks import TASKS
from .io.batch import ON_LONG
from .io.read import FORMATS, ON_ERROR
from .io.tokenize import CONVENTIONS
from .models.weights import DTYPES, PACKAGED_MODELS
from .privacy.mechanism import MECHANISMS, UNITS, PrivacyConfigError, PrivacySpec

__all__ = ["ConfigError", "Settings", "settings_from_cfg", "DEVICES", "TRANSPORTS", "as_bool", "choice", "integer",
           "nonneg", "positive", "privacy_spec"]

DEVICES = ("cpu", "cuda")
TRANSPORTS = ("mpi", "torch")


@dataclass(frozen=True)
class Settings:
    task: str
    pooling: str | None          # task=embed: null until the model folder fills it in (models/sentence.py)
    normalize: bool | None
    max_seq_length: int | None
    model_path: str | None
    model_packaged: str
    model_dtype: str
    k: int
    head: str
    partition: str | tuple[int, ...]
    owner_tail: int | None
    head_cost: float | None
    privacy: PrivacySpec
    data_path: str | None
    data_format: str
    text_field: str
    max_length: int
    batch_size: int
    padding_side: str
    bucket_window: int
    on_error: str
    on_long: str
    output_path: str
    overwrite: bool
    allow_shared: bool
    resume: bool
    threads: int | None
    inflight: int | None
    turns: bool | None
    timeout: float
    wire_dtype: str | None
    on_nonfinite: str
    log_every: float
    trace: str | None
    device: str
    owner_device: str
    transport: str
    cuda_aware_mpi: bool | None
    num_shards: int = 1
    shard: int = 0
    model_adapters: str | None = None
    denoiser: str | None = None  # split.denoiser: folder of rank 0's denoiser (head on the owner)
    # task=generate
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False
    hide_finish: bool = False
    prefill_tokens: int = 512  # runtime.prefill_tokens: prompt tokens a generation lane takes per step
    chat_template: bool = False
    # rows beyond one text field (data.*) and score outputs beyond per-row sums (task.*)
    messages_field: str | None = "messages"
    prompt_field: str | None = None
    completion_field: str | None = None
    token_logprobs: bool = False
    top_logprobs: int = 0
    convention: str = "hf"  # task.convention (task=score): "hf" or "lm_eval", how rows are tokenized and scored
    id_field: str | None = None  # data.id_field: each row's own id, kept in the results (dataset `id`)


POOLINGS = ("mean", "cls", "last")


def choice(name: str, value: Any, allowed) -> Any:
    if not isinstance(value, (str, int, float, bool, type(None))) or value not in allowed:
        raise ConfigError(f"{name}={value!r} must be one of {list(allowed)}")
    return value


def integer(name: str, value: Any, low: int | None = None, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}={value!r} must be an integer")
    if low is not None and value < low:
        raise ConfigError(f"{name}={value} must be >= {low}")
    return value


def positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive number")
    return float(value)


def nonneg(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{name}={value!r} must be a number >= 0")
    return float(value)


def as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be true or false")
    return value


def privacy_spec(p: dict, k: Any) -> PrivacySpec:
    mechanism = choice("privacy.mechanism", p.get("mechanism"), MECHANISMS)
    clip = p.get("clip")
    if clip is not None and clip != "auto":
        clip = positive("privacy.clip", clip)
    percentile = positive("privacy.clip_percentile", p.get("clip_percentile", 90))
    if percentile > 100:
        raise ConfigError(f"privacy.clip_percentile={percentile} must be in (0, 100]")
    delta = p.get("delta")
    if delta is not None and (positive("privacy.delta", delta) >= 1):
        raise ConfigError(f"privacy.delta={delta} must be in (0, 1)")
    spec = PrivacySpec(
        mechanism=mechanism,
        unit=choice("privacy.unit", p.get("unit", "sequence"), UNITS),
        epsilon=None if p.get("epsilon") is None else positive("privacy.epsilon", p["epsilon"]),
        delta=None if delta is None else float(delta),
        clip=clip,
        clip_percentile=percentile,
        calibration_path=None if p.get("calibration_path") is None else str(p["calibration_path"]),
        sigma=None if p.get("sigma") is None else nonneg("privacy.sigma", p["sigma"]),
        seed=integer("privacy.seed", p.get("seed"), 0, allow_none=True),
        releases=integer("privacy.releases", p.get("releases", 1), 1),
        key_path=None if p.get("key_path") is None else str(p["key_path"]),
    )
    try:
        spec.check(k if isinstance(k, int) else 0)
    except PrivacyConfigError as exc:
        raise ConfigError(str(exc)) from None
    return spec


def _denoiser_option(split: dict) -> str | None:
    path = split.get("denoiser")
    if path in (None, ""):
        return None
    if split["head"] != "owner":
        raise ConfigError(f"split.denoiser={path} needs split.head=owner: the denoiser runs on rank 0 on the final "
                          "states the workers send back")
    return str(path)


def _on_error(data) -> str:
    """``data.on_error``; null: ``skip`` for an OpenAI batch file (a refused request gets its error line in
    the output, as OpenAI and vLLM answer it, and the other requests run), else ``fail``."""
    value = data.get("on_error")
    if value is None:
        return "skip" if data.get("format") == "openai_batch" else "fail"
    return value


def settings_from_cfg(cfg: DictConfig) -> Settings:
    """Check every option once and return typed settings; raise :class:`ConfigError` naming the key."""
    try:
        c = OmegaConf.to_container(cfg, resolve=True)
    except Exception as exc:  # interpolation errors
        raise ConfigError(f"cannot resolve the configuration: {exc}") from None
    task, model, split, privacy = c["task"], c["model"], c["split"], c["privacy"]
    data, out, rt = c["data"], c["output"], c["runtime"]
    partition = split["partition"]
    if isinstance(partition, (list, tuple, ListConfig)):
        partition = tuple(integer("split.partition[]", p, 0) for p in partition)
    else:
        choice("split.partition", partition, PARTITIONS)
    if not out.get("path"):
        raise ConfigError("output.path must name the HDF5 results file")
    turns = None if rt.get("turns") is None else as_bool("runtime.turns", rt["turns"])
    if turns and task["name"] != "generate":
        raise ConfigError(f"runtime.turns=true applies to task=generate (one generation lane by turns), not "
                          f"task={task['name']}; leave it null")
    return Settings(
        task=choice("task.name", task["name"], TASKS),
        pooling=None if task.get("pooling") is None else choice("task.pooling", task["pooling"], POOLINGS),
        normalize=None if task.get("normalize") is None else as_bool("task.normalize", task["normalize"]),
        max_seq_length=integer("task.max_seq_length", task.get("max_seq_length"), 1, allow_none=True),
        model_path=model.get("path"),
        model_packaged=choice("model.packaged", model.get("packaged"), PACKAGED_MODELS),
        model_adapters=None if model.get("adapters") is None else str(model["adapters"]),
        model_dtype=choice("model.dtype", model.get("dtype", "float32"), DTYPES),
        k=integer("split.k", split["k"], 0),
        head=choice("split.head", split["head"], HEAD_PLACEMENTS),
        partition=partition,
        owner_tail=integer("split.owner_tail", split.get("owner_tail"), 0, allow_none=True),
        head_cost=None if split.get("head_cost") is None else nonneg("split.head_cost", split["head_cost"]),
        denoiser=_denoiser_option(split),
        privacy=privacy_spec(privacy, split["k"]),
        data_path=data.get("path"),
        data_format=choice("data.format", data.get("format", "auto"), ("auto", *FORMATS)),
        text_field=str(data.get("text_field", "text")),
        max_length=integer("data.max_length", data["max_length"], 2),
        batch_size=integer("data.batch_size", data["batch_size"], 1),
        padding_side=choice("data.padding_side", data.get("padding_side", "right"), ("left", "right")),
        bucket_window=integer("data.bucket_window", data.get("bucket_window", 0), 0),
        on_error=choice("data.on_error", _on_error(data), ON_ERROR),
        on_long=choice("data.on_long", data.get("on_long", "truncate"), ON_LONG),
        output_path=str(out["path"]),
        overwrite=as_bool("output.overwrite", out.get("overwrite", False)),
        allow_shared=as_bool("output.allow_shared", out.get("allow_shared", False)),
        resume=as_bool("output.resume", out.get("resume", False)),
        threads=integer("runtime.threads", rt.get("threads"), 1, allow_none=True),
        inflight=integer("runtime.inflight", rt.get("inflight"), 1, allow_none=True),
        turns=turns,
        prefill_tokens=integer("runtime.prefill_tokens", rt.get("prefill_tokens", 512), 1),
        timeout=positive("runtime.timeout", rt.get("timeout", 300)),
        wire_dtype=choice("runtime.wire_dtype", rt.get("wire_dtype"), (None, *DTYPES)),
        on_nonfinite=choice("runtime.on_nonfinite", rt.get("on_nonfinite", "error"), ("error", "flag")),
        log_every=positive("runtime.log_every", rt.get("log_every", 10)),
        trace=_trace_path(rt.get("trace")),
        device=choice("runtime.device", rt.get("device", "cpu"), DEVICES),
        owner_device=choice("runtime.owner_device", rt.get("owner_device") or rt.get("device", "cpu"), DEVICES),
        transport=choice("runtime.transport", rt.get("transport", "mpi"), TRANSPORTS),
        cuda_aware_mpi=choice("runtime.cuda_aware_mpi", rt.get("cuda_aware_mpi"), (None, True, False)),
        **_shards(data.get("num_shards"), data.get("shard"), os.environ),
        chat_template=as_bool("data.chat_template", data.get("chat_template", False)),
        **_generate_options(task),
        **_row_options(task, data),
    )


def _trace_path(value: Any) -> str | None:
    """``runtime.trace``: where rank 0 writes the ranks' timeline; its folder must exist."""
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    if not path.parent.is_dir():
        raise ConfigError(f"runtime.trace={value}: folder {path.parent} does not exist")
    if path.is_dir():
        raise ConfigError(f"runtime.trace={value} is a folder; give a file name (e.g. trace.json)")
    return str(path)


def _field(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name}={value!r} must be a field name or null")
    return value


def _row_options(task: dict, data: dict) -> dict:
    """What a row holds (data.messages_field, data.prompt_field / data.completion_field, OpenAI batch lines) and
    what task=score writes per token (task.token_logprobs, task.top_logprobs), checked against the task."""
    name, fmt = task.get("name"), data.get("format", "auto")
    prompt = _field("data.prompt_field", data.get("prompt_field"))
    completion = _field("data.completion_field", data.get("completion_field"))
    if (prompt is None) != (completion is None):
        raise ConfigError("data.prompt_field and data.completion_field go together: set both (continuation "
                          "scoring) or neither")
    if completion is not None and name != "score":
        raise ConfigError(f"data.completion_field scores a continuation: it needs task=score, not task={name}")
    if completion is not None and fmt == "text":
        raise ConfigError("data.completion_field needs rows with fields (jsonl, csv, parquet), not data.format=text")
    if fmt == "openai_batch" and name not in ("generate", "embed"):
        raise ConfigError(f"data.format=openai_batch reads chat and completion requests (task=generate) or "
                          f"embedding requests (task=embed), not task={name}")
    id_field = _field("data.id_field", data.get("id_field"))
    if id_field is not None and fmt in ("text", "openai_batch"):
        raise ConfigError(f"data.id_field needs rows with fields (jsonl, csv, parquet), not data.format={fmt}"
                          + (" (an OpenAI batch line's custom_id is its id)" if fmt == "openai_batch" else ""))
    opts = {"messages_field": _field("data.messages_field", data.get("messages_field", "messages")),
            "prompt_field": prompt, "completion_field": completion, "id_field": id_field}
    if name == "score":
        opts["token_logprobs"] = as_bool("task.token_logprobs", task.get("token_logprobs", False))
        opts["top_logprobs"] = integer("task.top_logprobs", task.get("top_logprobs", 0), 0)
        opts["convention"] = choice("task.convention", task.get("convention", "hf"), CONVENTIONS)
    if name == "generate":  # each generated token's log-probability, and the N most likely alternatives
        top = integer("task.top_logprobs", task.get("top_logprobs", 0), 0)
        if top > 20:
            raise ConfigError(f"task.top_logprobs={top} must be at most 20 (as OpenAI's top_logprobs)")
        opts["token_logprobs"] = as_bool("task.logprobs", task.get("logprobs", False)) or top > 0
        opts["top_logprobs"] = top
    return opts


def _stop_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) and s for s in items):
        raise ConfigError(f"task.stop={value!r} must be a list of non-empty strings")
    return tuple(items)


def _generate_options(task: dict) -> dict:
    """Decoding options of task=generate (other tasks ignore them)."""
    if task.get("name") != "generate":
        return {}
    opts = dict(
        max_new_tokens=integer("task.max_new_tokens", task.get("max_new_tokens", 64), 1),
        stop=_stop_strings(task.get("stop")),
        temperature=nonneg("task.temperature", task.get("temperature", 0.0)),
        top_k=integer("task.top_k", task.get("top_k", 0), 0),
        top_p=positive("task.top_p", task.get("top_p", 1.0)),
        seed=integer("task.seed", task.get("seed", 0), 0),
        ignore_eos=as_bool("task.ignore_eos", task.get("ignore_eos", False)),
        hide_finish=as_bool("task.hide_finish", task.get("hide_finish", False)),
    )
    if opts["top_p"] > 1:
        raise ConfigError(f"task.top_p={opts['top_p']} must be in (0, 1]")
    if opts["temperature"] == 0 and (opts["top_k"] or opts["top_p"] < 1):
        key = "task.top_k" if opts["top_k"] else "task.top_p"
        raise ConfigError(f"{key} only applies to sampling: set task.temperature > 0 (0 = greedy decoding)")
    return opts


def _shards(num_shards: Any, shard: Any, env) -> dict:
    """``data.num_shards`` / ``data.shard``, defaulting from a Slurm job array.

    In a job array ``--array=A-B[:S]`` Slurm sets SLURM_ARRAY_TASK_COUNT and, per task,
    SLURM_ARRAY_TASK_ID (A, A+S, ... B), SLURM_ARRAY_TASK_MIN (A) and SLURM_ARRAY_TASK_STEP (S): the task
    then processes shard (ID - MIN) / STEP of COUNT unless the options say otherwise.
    """
    array = {k: env.get(f"SLURM_ARRAY_TASK_{k}") for k in ("ID", "COUNT", "MIN", "STEP")}
    in_array = array["ID"] is not None and array["COUNT"] is not None
    from_array = num_shards is None and in_array
    if num_shards is None:
        num_shards = int(array["COUNT"]) if in_array else 1
    num_shards = integer("data.num_shards", num_shards, 1)
    if shard is None:
        if num_shards == 1:
            shard = 0
        elif in_array and (from_array or int(array["COUNT"]) == num_shards):
            step = int(array["STEP"] or 1) or 1
            shard = (int(array["ID"]) - int(array["MIN"] or 0)) // step
            if not 0 <= shard < num_shards:
                raise ConfigError(f"data.shard: the job array task SLURM_ARRAY_TASK_ID={array['ID']} (min "
                                  f"{array['MIN']}, step {step}) gives shard {shard}, outside 0..{num_shards - 1}; "
                                  "set data.shard explicitly")
        else:
            raise ConfigError(f"data.shard must be set when data.num_shards={num_shards} outside a Slurm job array "
                              "of as many tasks")
    shard = integer("data.shard", shard, 0)
    if shard >= num_shards:
        raise ConfigError(f"data.shard={shard} must be < data.num_shards={num_shards}")
    return {"num_shards": num_shards, "shard": shard}
