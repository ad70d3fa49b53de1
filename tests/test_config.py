"""Compose the real Hydra config (conf/infer.yaml) and check nesa_hpc.config.settings_from_cfg."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf

from nesa_hpc.config import ConfigError, Settings, settings_from_cfg

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(scope="module")
def hydra_ctx():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield


def _compose(*overrides: str):
    return compose(config_name="infer", overrides=list(overrides))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_defaults(hydra_ctx):
    cfg = _compose()
    assert "hydra" not in cfg
    s = settings_from_cfg(cfg)
    assert isinstance(s, Settings)
    assert s.task == "score"
    assert s.model_packaged == "smollm2-135m-instruct"
    assert s.model_path is None
    assert s.model_dtype == "float32"
    assert (s.k, s.head, s.partition) == (2, "owner", "uniform")
    assert s.privacy.mechanism == "none" and not s.privacy.adds_noise
    assert (s.data_path, s.data_format, s.text_field) == (None, "auto", "text")
    assert (s.max_length, s.batch_size, s.padding_side) == (512, 8, "right")
    assert (s.output_path, s.overwrite) == ("results.h5", False)
    assert (s.threads, s.inflight, s.device, s.owner_device) == (None, None, "cpu", "cpu")
    assert (s.transport, s.cuda_aware_mpi) == ("mpi", None)
    assert s.timeout == 300.0 and isinstance(s.timeout, float)
    assert s.log_every == 10.0
    assert s.pooling is None and s.normalize is None and s.max_seq_length is None  # from the folder (task=embed)


def test_every_group_has_the_expected_options():
    assert _options("model") == ["gemma3", "minilm", "smollm2"]
    assert _options("task") == ["embed", "generate", "score"]
    assert _options("privacy") == ["dchi", "gaussian", "none", "sigma"]
    for group in ("split", "data", "runtime"):
        assert _options(group) == ["default"]


@pytest.mark.parametrize(
    "group",
    ["model", "task", "privacy", "split", "data", "runtime"],
)
def test_every_option_composes_and_validates(hydra_ctx, group):
    options = _options(group)
    assert options
    for option in options:
        extra = ["split.k=0"] if (group, option) == ("privacy", "dchi") else []  # metric DP is for k=0 only
        cfg = _compose(f"{group}={option}", *extra)
        expected = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
        assert OmegaConf.to_container(cfg[group]) == OmegaConf.to_container(expected)
        settings_from_cfg(cfg)


def test_model_minilm(hydra_ctx, minilm_path):
    """Left null, the embedding options come from the folder's sentence-transformers files; options win."""
    from dataclasses import replace

    from nesa_hpc.models.sentence import embed_settings, sentence_settings

    s = settings_from_cfg(_compose("model=minilm", "task=embed"))
    assert s.model_packaged == "all-minilm-l6-v2"
    assert s.task == "embed"
    assert (s.pooling, s.normalize, s.max_seq_length) == (None, None, None)
    assert sentence_settings(minilm_path) == {"pooling": "mean", "normalize": True, "max_seq_length": 256,
                                              "other_modules": []}
    filled = embed_settings(s, minilm_path)
    assert (filled.pooling, filled.normalize, filled.max_seq_length, filled.max_length) == ("mean", True, 256, 256)
    mine = embed_settings(replace(s, pooling="cls", normalize=False, max_seq_length=1000), minilm_path)
    assert (mine.pooling, mine.normalize, mine.max_length) == ("cls", False, 512)
    assert embed_settings(replace(s, task="score"), minilm_path) == replace(s, task="score")


def test_task_embed_options(hydra_ctx):
    s = settings_from_cfg(_compose("task=embed", "task.pooling=last", "task.normalize=true"))
    assert (s.task, s.pooling, s.normalize) == ("embed", "last", True)


def test_valid_overrides(hydra_ctx):
    s = settings_from_cfg(_compose(
        "split.k=0", "split.head=last", "split.partition=[10,9,9]", "model.dtype=bfloat16",
        "data.path=/tmp/x.csv", "data.format=csv", "data.text_field=body", "data.max_length=2",
        "data.batch_size=1", "data.padding_side=left", "output.path=out.h5", "output.overwrite=true",
        "runtime.threads=2", "runtime.inflight=1", "runtime.timeout=0.5", "runtime.log_every=1",
        "model.path=/models/llama",
    ))
    assert s.k == 0 and s.head == "last"
    assert s.partition == (10, 9, 9)
    assert s.model_dtype == "bfloat16"
    assert (s.data_path, s.data_format, s.text_field) == ("/tmp/x.csv", "csv", "body")
    assert (s.max_length, s.batch_size, s.padding_side) == (2, 1, "left")
    assert (s.output_path, s.overwrite) == ("out.h5", True)
    assert (s.threads, s.inflight, s.timeout, s.log_every) == (2, 1, 0.5, 1.0)
    assert s.model_path == "/models/llama"


def test_device_and_transport_options(hydra_ctx):
    # cuda is a valid choice here; whether a GPU is usable is checked by each rank at start-up
    s = settings_from_cfg(_compose("runtime.device=cuda", "runtime.transport=torch", "runtime.cuda_aware_mpi=false"))
    assert (s.device, s.owner_device, s.transport, s.cuda_aware_mpi) == ("cuda", "cuda", "torch", False)
    s = settings_from_cfg(_compose("runtime.device=cuda", "runtime.owner_device=cpu"))
    assert (s.device, s.owner_device) == ("cuda", "cpu")


def test_partition_with_zeros_is_left_to_topology(hydra_ctx):
    # zero counts are valid when split.k equals num_layers, which the config cannot know
    assert settings_from_cfg(_compose("split.partition=[0,0]")).partition == (0, 0)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["split.k=-1"], "split.k"),
        (["split.k=abc"], "split.k"),
        (["split.k=1.5"], "split.k"),
        (["split.k=true"], "split.k"),
        (["split.head=middle"], "split.head"),
        (["split.partition=[1,-2]"], "split.partition"),
        (["split.partition=[1,a]"], "split.partition"),
        (["split.partition=even"], "split.partition"),
        (["data.batch_size=0"], "data.batch_size"),
        (["data.batch_size=-4"], "data.batch_size"),
        (["data.max_length=1"], "data.max_length"),
        (["data.format=xml"], "data.format"),
        (["data.padding_side=center"], "data.padding_side"),
        (["task=embed", "task.pooling=max"], "task.pooling"),
        (["task=embed", "task.normalize=maybe"], "task.normalize"),
        (["task.name=translate"], "task.name"),
        (["model.dtype=int8"], "model.dtype"),
        (["model.packaged=gpt-5"], "model.packaged"),
        (["privacy.mechanism=dp"], "privacy.mechanism"),
        (["privacy=gaussian", "privacy.unit=token"], "privacy.unit=token with split.k=2"),
        (["privacy=gaussian", "privacy.unit=word"], "privacy.unit"),
        (["privacy=gaussian", "privacy.epsilon=0"], "privacy.epsilon"),
        (["privacy=gaussian", "privacy.delta=1"], "privacy.delta"),
        (["privacy=gaussian", "privacy.delta=null"], "privacy.delta"),
        (["privacy=gaussian", "privacy.clip=-1"], "privacy.clip"),
        (["privacy=gaussian", "privacy.clip=null"], "privacy.clip"),
        (["privacy=gaussian", "privacy.clip_percentile=101"], "privacy.clip_percentile"),
        (["privacy=gaussian", "privacy.releases=0"], "privacy.releases"),
        (["privacy=gaussian", "privacy.seed=-1"], "privacy.seed"),
        (["privacy=sigma", "privacy.sigma=-0.5"], "privacy.sigma"),
        (["privacy=dchi"], "split.k=0"),
        (["runtime.timeout=0"], "runtime.timeout"),
        (["runtime.timeout=-5"], "runtime.timeout"),
        (["runtime.timeout=soon"], "runtime.timeout"),
        (["runtime.log_every=0"], "runtime.log_every"),
        (["runtime.threads=0"], "runtime.threads"),
        (["runtime.inflight=0"], "runtime.inflight"),
        (["runtime.turns=maybe"], "runtime.turns"),
        (["runtime.turns=true"], "runtime.turns=true applies to task=generate"),
        (["runtime.device=gpu"], "runtime.device"),
        (["runtime.owner_device=tpu"], "runtime.owner_device"),
        (["runtime.transport=nccl"], "runtime.transport"),
        (["runtime.cuda_aware_mpi=maybe"], "runtime.cuda_aware_mpi"),
        (["data.num_shards=0"], "data.num_shards"),
        (["data.num_shards=2", "data.shard=5"], "data.shard"),
        (["output.path=null"], "output.path"),
        (["output.path=''"], "output.path"),
        (["output.overwrite=yes"], "output.overwrite"),
    ],
)
def test_bad_values_raise_config_error(hydra_ctx, overrides, key):
    cfg = _compose(*overrides)
    with pytest.raises(ConfigError, match=re.escape(key)):
        settings_from_cfg(cfg)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.dtype=[float32]"], "model.dtype"),
        (["model.packaged=[smollm2-135m-instruct]"], "model.packaged"),
        (["model.dtype={a:1}"], "model.dtype"),
    ],
)
def test_container_values_raise_config_error(hydra_ctx, overrides, key):
    # a list/dict where a name is expected must be refused with ConfigError like any other bad value
    cfg = _compose(*overrides)
    with pytest.raises(ConfigError, match=re.escape(key)):
        settings_from_cfg(cfg)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "override",
    ["foo=1", "split.bogus=1", "data.batchsize=4", "task.pooling=max", "model=gpt5", "task=translate"],
)
def test_unknown_keys_and_options_refused_at_compose(hydra_ctx, override):
    # task.pooling does not exist in task=score; model=gpt5 and task=translate are not options
    with pytest.raises(HydraException, match=r"Could not (override|find)"):
        _compose(override)


def test_turns_default_and_threads(hydra_ctx, monkeypatch):
    """runtime.turns: null until the job knows where its ranks run; on by default for task=generate when every
    rank computes on the CPU of one node, and then every core of the node goes to each rank."""
    from dataclasses import replace

    from nesa_hpc.engine import job

    s = settings_from_cfg(_compose("task=generate"))
    assert s.turns is None
    assert job.takes_turns(s, 2, 2) and job.takes_turns(s, 3, 3)
    assert not job.takes_turns(s, 1, 1)  # no pipeline
    assert not job.takes_turns(s, 4, 2)  # ranks on two nodes: lanes side by side
    assert not job.takes_turns(replace(s, device="cuda", owner_device="cuda"), 2, 2)
    assert not job.takes_turns(replace(s, owner_device="cuda"), 2, 2)
    assert not job.takes_turns(replace(s, turns=False), 2, 2)
    assert job.takes_turns(replace(s, turns=True), 4, 2)
    assert not job.takes_turns(settings_from_cfg(_compose("task=score")), 2, 2)
    assert settings_from_cfg(_compose("task=generate", "runtime.turns=false")).turns is False
    monkeypatch.setattr(job.os, "sched_getaffinity", lambda _: set(range(8)), raising=False)
    assert job.threads_for(s, 2) == 4
    assert job.threads_for(s, 2, turns=True) == 8
    assert job.threads_for(replace(s, threads=3), 2, turns=True) == 3


def test_openmp_spin_is_capped_only_where_ranks_may_take_turns(monkeypatch):
    from omegaconf import OmegaConf

    from nesa_hpc.engine.openmp import TURNS_SPINCOUNT, prepare_openmp

    def spin(task: str, turns, preset: str | None = None) -> str | None:
        monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
        if preset is not None:
            monkeypatch.setenv("GOMP_SPINCOUNT", preset)
        prepare_openmp(OmegaConf.create({"task": {"name": task}, "runtime": {"turns": turns}}))
        return os.environ.get("GOMP_SPINCOUNT")

    assert spin("generate", None) == spin("generate", True) == TURNS_SPINCOUNT
    assert spin("generate", False) is None and spin("score", None) is None
    assert spin("generate", None, preset="7") == "7"  # the user's own setting stays
