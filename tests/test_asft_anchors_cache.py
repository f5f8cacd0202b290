"""A cached anchors file is reused only when it was built for this run: the recorded aligned / base
checkpoints, revisions, projector and target modules must match (else a one-line error naming the
field, or a rebuild when asked); an existing empty cache folder is a usable cache location."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from test_asft_training import lora_model, make_tiny_setup

from hf_safety_merge.errors import ConfigError
from hf_safety_merge.testing.models import make_tiny_model, perturb, save
from hf_safety_merge.training import add_safety_mixin
from hf_safety_merge.training.asft.anchors import DEFAULT_ANCHORS_FILENAME, AlignmentAnchors


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    paths = make_tiny_setup(tmp_path_factory.mktemp("asft-cache"), n_examples=8)
    # a second "base": another unaligned checkpoint of the same shapes
    from test_asft_training import TINY

    other = perturb(make_tiny_model("llama", 0, **TINY), 0.2, 7)
    paths["other_base"] = save(other, paths["base"].parent / "other_base")
    return paths


def _attach(setup: dict[str, Path], cache: Path, base: str = "base", **kw: Any) -> Any:
    model = add_safety_mixin(lora_model(setup["aligned"], targets=kw.pop("targets", ("q_proj", "v_proj"))))
    model.attach_alignment_anchors(aligned=setup["aligned"], base=setup[base], cache_path=cache, **kw)
    return model


def _c(model: Any) -> dict[str, torch.Tensor]:
    return {b.target.key: b.anchor.dense().clone() for b in model._safety_bindings}


def test_cache_reused_only_when_it_matches(setup: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "anchors.safetensors"
    first = _c(_attach(setup, cache))
    assert cache.is_file()
    meta = AlignmentAnchors.load(cache).meta
    assert meta["base"] == str(setup["base"]) and meta["base_path"] == str(setup["base"].resolve())

    # the same run again: loaded (not recomputed), same anchors
    stamp = cache.stat().st_mtime_ns
    again = _c(_attach(setup, cache))
    assert cache.stat().st_mtime_ns == stamp
    assert all(torch.equal(first[k], again[k]) for k in first)
    # the same checkpoint spelled differently (a relative path) is the same checkpoint
    rel = Path("..") / setup["base"].relative_to(setup["base"].parents[1])
    model = add_safety_mixin(lora_model(setup["aligned"], targets=("q_proj", "v_proj")))
    cwd = os.getcwd()
    os.chdir(setup["base"].parent)
    try:
        model.attach_alignment_anchors(aligned=setup["aligned"], base=rel, cache_path=cache)
    finally:
        os.chdir(cwd)
    assert cache.stat().st_mtime_ns == stamp

    # a changed base model: refused, one line naming the field
    with pytest.raises(ConfigError, match=r"built with base model .*other_base.*rebuild_stale=True") as e:
        _attach(setup, cache, base="other_base")
    assert "\n" not in str(e.value)
    # a changed revision, projector, or modules it does not cover: refused too
    with pytest.raises(ConfigError, match="base revision None, but this run asks for 'v2'"):
        _attach(setup, cache, base_revision="v2")
    with pytest.raises(ConfigError, match="projector 'safe_lora', but this run asks for 'topk'"):
        _attach(setup, cache, projector="topk", k=2)
    with pytest.raises(ConfigError, match="not for 2 of this run's LoRA target modules"):
        _attach(setup, cache, targets=("q_proj", "v_proj", "up_proj"))
    assert cache.stat().st_mtime_ns == stamp  # nothing was overwritten
    # fewer modules than cached is fine: each anchor depends on its own module only
    _attach(setup, cache, targets=("q_proj",))

    # the same folder retrained in place (new weight files): stale, refused
    retrained = tmp_path / "retrained_base"
    shutil.copytree(setup["base"], retrained)
    built = tmp_path / "retrained.safetensors"
    setup2 = {**setup, "retrained": retrained}
    _attach(setup2, built, base="retrained")
    from test_asft_training import TINY

    save(perturb(make_tiny_model("llama", 0, **TINY), 0.3, 9), retrained)
    with pytest.raises(ConfigError, match=r"as it was before its weight files changed \(model.safetensors\)"):
        _attach(setup2, built, base="retrained")

    # rebuild on request: the cache now holds the other base's anchors
    rebuilt = _c(_attach(setup, cache, base="other_base", rebuild_stale=True))
    assert AlignmentAnchors.load(cache).meta["base"] == str(setup["other_base"])
    assert all(not torch.equal(first[k], rebuilt[k]) for k in first)
    fresh = _c(_attach(setup, tmp_path / "fresh.safetensors", base="other_base"))
    assert all(torch.equal(fresh[k], rebuilt[k]) for k in fresh)


def test_empty_cache_folder_is_usable(setup: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "anchors"
    folder.mkdir()
    _attach(setup, folder)
    assert (folder / DEFAULT_ANCHORS_FILENAME).is_file()
    _attach(setup, folder)  # and reused from there
    with pytest.raises(ConfigError, match="built with base model"):
        _attach(setup, folder, base="other_base")


def test_trainer_refuses_or_rebuilds_stale_cache(setup: dict[str, Path], tmp_path: Path) -> None:
    from datasets import load_dataset
    from peft import LoraConfig

    from hf_safety_merge import AsFTConfig, AsFTTrainer

    ds = load_dataset(str(setup["data"]), split="train")

    def trainer(base: Path, cache: Path, **kw: Any) -> Any:
        args = AsFTConfig(
            output_dir=str(tmp_path / "out"), asft_base_model=str(base), asft_anchors_path=str(cache), max_steps=1,
            per_device_train_batch_size=2, report_to="none", use_cpu=True, save_strategy="no", max_length=16,
            disable_tqdm=True, **kw,
        )
        return AsFTTrainer(
            model=str(setup["aligned"]), args=args, train_dataset=ds,
            peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        )

    folder = tmp_path / "empty"
    folder.mkdir()  # an existing empty folder: the anchors are computed and cached inside it
    trainer(setup["base"], folder)
    cached = folder / DEFAULT_ANCHORS_FILENAME
    assert cached.is_file()
    with pytest.raises(ConfigError, match=r"built with base model .*asft_rebuild_stale_anchors=true"):
        trainer(setup["other_base"], folder)
    t = trainer(setup["other_base"], folder, asft_rebuild_stale_anchors=True)
    assert AlignmentAnchors.load(cached).meta["base"] == str(setup["other_base"])
    assert t.asft_anchors.meta["base"] == str(setup["other_base"])
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
