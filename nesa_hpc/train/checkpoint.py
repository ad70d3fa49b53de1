"""Training checkpoints (per rank, ``state.json`` last) and the exported adapter or merged model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..engine.job import rank_modules, settle
from ..errors import ConfigError
from ..models.lora import base_name, lora_config, merge_lora, peft_name
from .options import TrainSpec

if TYPE_CHECKING:
    from .step import Trainer

__all__ = ["latest_checkpoint", "checkpoint_root", "save_rank", "load_rank", "export_adapter", "export_merged",
           "export"]

def checkpoint_root(spec: TrainSpec) -> Path:
    return Path(spec.out_dir) / "checkpoints"


def latest_checkpoint(spec: TrainSpec) -> Path | None:
    """The newest complete checkpoint (its ``state.json`` is written last)."""
    root = checkpoint_root(spec)
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def _rank_dir(trainer: Trainer, folder: Path) -> Path:
    """Where a rank keeps its part of a checkpoint: rank 0's (trained on the raw data with
    ``train.owner_trainable``) goes under ``train.owner_dir``."""
    return Path(trainer.spec.owner_dir) / "checkpoints" / folder.name if trainer.rank == 0 else folder


def save_rank(trainer: Trainer, folder: Path) -> None:
    from safetensors.torch import save_file

    folder = _rank_dir(trainer, folder)
    folder.mkdir(parents=True, exist_ok=True)
    r = trainer.rank
    if trainer.params:
        save_file({n: p.detach().cpu().contiguous() for n, p in trainer.params}, str(folder / f"rank-{r}.safetensors"))
        torch.save({"optimizer": trainer.opt.state_dict(), "scheduler": trainer.sched.state_dict()},
                   folder / f"rank-{r}.optim.pt")


def load_rank(trainer: Trainer, folder: Path) -> None:
    from safetensors.torch import load_file

    if not trainer.params:
        return
    folder = _rank_dir(trainer, folder)
    path = folder / f"rank-{trainer.rank}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"train.resume: {path} is missing (the checkpoint belongs to another layout)")
    tensors = load_file(str(path))
    names = {n for n, _ in trainer.params}
    if set(tensors) != names:
        raise ConfigError(f"train.resume: {path} holds other parameters than rank {trainer.rank} trains now "
                         f"(world size, split or train.* options changed since the checkpoint)")
    with torch.no_grad():
        for n, p in trainer.params:
            p.copy_(tensors[n].to(p.device))
    state = torch.load(folder / f"rank-{trainer.rank}.optim.pt", map_location=trainer.device, weights_only=True)
    trainer.opt.load_state_dict(state["optimizer"])
    trainer.sched.load_state_dict(state["scheduler"])


def export_adapter(trainer: Trainer, comm, folder: Path, model_folder: str, layers: list[int]) -> None:
    """peft's adapter format: ``adapter_config.json`` + ``adapter_model.safetensors`` (gathered on rank 0)."""
    from safetensors.torch import save_file

    mine = {peft_name(n): p.detach().cpu().contiguous() for n, p in trainer.params if "lora_" in n}
    settle(comm)
    parts = comm.gather(mine, root=0) if comm is not None else [mine]
    if trainer.rank != 0:
        return
    tensors = {k: v for part in parts for k, v in part.items()}
    folder.mkdir(parents=True, exist_ok=True)
    lora_config(trainer.adapter, trainer.spec, layers, model_folder).save_pretrained(str(folder))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def export_merged(trainer: Trainer, comm, folder: Path, model_folder: str, modules: list[str]) -> None:
    """A Hugging Face model folder: LoRA merged into the weights, one safetensors shard per rank written by
    that rank, the index, config and tokenizer files written by rank 0."""
    from safetensors.torch import save_file

    adapter, rank = trainer.adapter, trainer.rank
    size = comm.Get_size() if comm is not None else 1
    merge_lora(adapter)
    tied = bool(getattr(adapter.config, "tie_word_embeddings", False))
    tensors = {}
    for module in modules:
        for n, p in adapter.model.get_submodule(module).named_parameters():
            full = base_name(f"{module}.{n}")
            if "lora_" in full or (tied and full in adapter.tied):
                continue
            tensors[full] = p.detach().cpu().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    shard = f"model-{rank + 1:05d}-of-{size:05d}.safetensors"
    save_file(tensors, str(folder / shard), metadata={"format": "pt"})
    names = {n: shard for n in tensors}
    sizes = sum(t.numel() * t.element_size() for t in tensors.values())
    settle(comm)
    parts = comm.gather((names, sizes), root=0) if comm is not None else [(names, sizes)]
    if rank != 0:
        return
    weight_map = {k: v for part, _ in parts for k, v in part.items()}
    index = {"metadata": {"total_size": sum(s for _, s in parts)}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for f in Path(model_folder).iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, folder / f.name)


def _layer_pos(adapter) -> int:
    return len(adapter.layer_module(0).split(".")) - 1


def _all_layers(trainer: Trainer) -> list[int]:
    """Every layer any rank trains (gathered), for the adapter's ``layers_to_transform``."""
    pos = _layer_pos(trainer.adapter)
    mine = sorted({int(n.split(".")[pos]) for n, _ in trainer.params if not n.startswith("denoiser.")})
    settle(trainer.comm)
    gathered = trainer.comm.allgather(mine) if trainer.comm is not None else [mine]
    return sorted({i for part in gathered for i in part})




def export(trainer: Trainer, spec: TrainSpec, model_folder: str) -> str | None:
    """Every rank writes its part of ``train.export`` (collectives inside); returns the folder (None: none)."""
    out = Path(spec.out_dir)
    if spec.export == "none":
        return None
    if spec.export == "adapter":
        layers = _all_layers(trainer)
        if not layers:  # train.layers=[]: only rank 0's denoiser was trained (written by the owner's loop)
            return None
        # rank 0's trained layers saw the raw rows and are not covered by the privacy guarantee: with a
        # mechanism on, rank 0 writes the adapter (gathered, its layers included) to its own folder
        if trainer.private and spec.owner_trainable:
            out = Path(spec.owner_dir)
        export_adapter(trainer, trainer.comm, out / "adapter", model_folder, layers)
        return str(out / "adapter")
    export_merged(trainer, trainer.comm, out / "model", model_folder,
                  rank_modules(trainer.rank, trainer.topo, trainer.adapter, "score"))
    return str(out / "model")
