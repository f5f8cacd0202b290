"""AsFT anchors built from Hub checkpoints record the commit each was read at; a cache is checked
against the commit the repo resolves to now (one metadata request, no weight download, or the
local HF cache's refs/ offline): a new upstream commit is refused in one line naming the model and
both commits, or rebuilt on request; an unchanged repo reuses the cache; a file without a commit
(older versions) still loads, with a warning. All over real HTTP against the local Hub double."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from local_hub import LocalHub, point_hf_at
from test_asft_training import TINY, lora_model, make_tiny_setup

from hf_safety_merge import push_folder
from hf_safety_merge.errors import ConfigError
from hf_safety_merge.testing.models import make_tiny_model, save
from hf_safety_merge.training import add_safety_mixin
from hf_safety_merge.training.asft.anchors import AlignmentAnchors

TOKEN = "hf_localTestToken0123456789abcdef"
BINDING_LOG = "hf_safety_merge.training.asft.binding"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHub]:
    h = LocalHub(tmp_path / "hub-storage", token=TOKEN).start()
    point_hf_at(h, tmp_path, monkeypatch)
    yield h
    h.stop()


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("asft-hub")
    paths = make_tiny_setup(root, n_examples=4)
    # the same base repo after an upstream change: one weight the anchors depend on is different
    base2 = save(make_tiny_model("llama", 0, **TINY), root / "base-v2")
    from safetensors.torch import load_file, save_file

    w = load_file(base2 / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    w[name] = w[name] + 0.05 * torch.randn(w[name].shape, generator=torch.Generator().manual_seed(3))
    save_file(w, base2 / "model.safetensors", metadata={"format": "pt"})
    paths["base_v2"] = base2
    return paths


@pytest.fixture
def repos(hub: LocalHub, local: dict[str, Path]) -> dict[str, str]:
    push_folder(local["base"], "org/base", commit_message="base v1")
    push_folder(local["aligned"], "org/aligned", commit_message="aligned")
    return {"base": hub.repos["org/base"].refs["main"], "aligned": hub.repos["org/aligned"].refs["main"]}


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every call of AlignmentAnchors.from_checkpoints (a recomputation), with its arguments."""
    calls: list[dict[str, Any]] = []
    original = AlignmentAnchors.from_checkpoints.__func__  # type: ignore[attr-defined]

    def spy(cls: type[AlignmentAnchors], aligned: Any, base: Any, *args: Any, **kw: Any) -> AlignmentAnchors:
        calls.append({"aligned": str(aligned), "base": str(base), **kw})
        return original(cls, aligned, base, *args, **kw)

    monkeypatch.setattr(AlignmentAnchors, "from_checkpoints", classmethod(spy))
    return calls


def _attach(local: dict[str, Path], cache: Path, **kw: Any) -> dict[str, torch.Tensor]:
    model = add_safety_mixin(lora_model(local["aligned"], targets=("q_proj", "v_proj")))
    kw.setdefault("aligned", "org/aligned")
    kw.setdefault("base", "org/base")
    model.attach_alignment_anchors(cache_path=cache, **kw)
    return {b.target.key: b.anchor.dense().clone() for b in model._safety_bindings}


def _weight_downloads(hub: LocalHub) -> list[str]:
    return [p for m, p, _ in hub.requests if "/resolve/" in p and p.endswith(".safetensors")]


def test_hub_commit_recorded_and_checked(hub: LocalHub, local: dict[str, Path], repos: dict[str, str],
                                         builds: list[dict[str, Any]], tmp_path: Path) -> None:
    cache = tmp_path / "anchors.safetensors"
    first = _attach(local, cache)
    assert len(builds) == 1
    meta = AlignmentAnchors.load(cache).meta
    assert meta["base_commit"] == repos["base"] and meta["aligned_commit"] == repos["aligned"]
    assert meta["base_revision"] is None and meta["base_files"] is None

    # (c) the repos unchanged: the cache is reused, at the cost of one metadata request per repo
    stamp = cache.stat().st_mtime_ns
    hub.requests.clear()
    again = _attach(local, cache)
    assert len(builds) == 1 and cache.stat().st_mtime_ns == stamp
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert sorted(p for _, p, _ in hub.requests) == ["/api/models/org/aligned", "/api/models/org/base"]

    # an upstream commit to the base repo changes one weight of the anchors' modules
    push_folder(local["base_v2"], "org/base", commit_message="base v2")
    new = hub.repos["org/base"].refs["main"]
    assert new != repos["base"]

    # (a) refused by default: one line naming the model and both commits; nothing downloaded or written
    hub.requests.clear()
    with pytest.raises(ConfigError) as e:
        _attach(local, cache)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"built with base model 'org/base' at commit {repos['base']}, but this run resolves it to commit {new}" in msg
    assert "rebuild_stale=True" in msg
    assert len(builds) == 1 and cache.stat().st_mtime_ns == stamp and not _weight_downloads(hub)

    # (b) rebuild on request: recomputed from the new commit, which the cache now records
    rebuilt = _attach(local, cache, rebuild_stale=True)
    assert len(builds) == 2
    meta = AlignmentAnchors.load(cache).meta
    assert meta["base_commit"] == new and meta["aligned_commit"] == repos["aligned"]
    assert not torch.equal(first["model.layers.0.self_attn.q_proj"], rebuilt["model.layers.0.self_attn.q_proj"])
    # ... and they are the anchors of the new base's weights
    from_files = _attach(local, tmp_path / "from-files.safetensors", aligned=local["aligned"], base=local["base_v2"])
    assert all(torch.equal(from_files[k], rebuilt[k]) for k in rebuilt)
    n = len(builds)
    _attach(local, cache)  # and reused as they are now
    assert len(builds) == n

    # pinned revisions keep working: the old commit, pinned, is not the cache's commit
    with pytest.raises(ConfigError, match=f"at commit {new}, but this run resolves it \\(revision '{repos['base']}'\\) to commit {repos['base']}"):
        _attach(local, cache, base_revision=repos["base"])
    # a cache built at a pinned commit stays valid whatever main does later
    pinned = tmp_path / "pinned.safetensors"
    _attach(local, pinned, base_revision=repos["base"])
    assert AlignmentAnchors.load(pinned).meta["base_commit"] == repos["base"]
    push_folder(local["base"], "org/base", commit_message="base v3")
    n = len(builds)
    assert torch.equal(_attach(local, pinned, base_revision=repos["base"])["model.layers.0.self_attn.q_proj"],
                       first["model.layers.0.self_attn.q_proj"])
    assert len(builds) == n


def test_aligned_repo_change_is_refused(hub: LocalHub, local: dict[str, Path], repos: dict[str, str],
                                        tmp_path: Path) -> None:
    cache = tmp_path / "anchors.safetensors"
    _attach(local, cache)
    push_folder(local["base_v2"], "org/aligned", commit_message="replace the aligned weights")
    new = hub.repos["org/aligned"].refs["main"]
    with pytest.raises(ConfigError, match=f"aligned model 'org/aligned' at commit {repos['aligned']}, but this run resolves it to commit {new}"):
        _attach(local, cache)


def _strip_commits(cache: Path) -> None:
    """Rewrite `cache` as an older version wrote it: no *_commit entries in its metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(cache), framework="pt") as f:
        md = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
    meta = json.loads(md["meta"])
    for key in ("aligned_commit", "base_commit"):
        del meta[key]
    md["meta"] = json.dumps(meta)
    save_file(tensors, str(cache), metadata=md)


def test_cache_without_commit_loads_with_warning(hub: LocalHub, local: dict[str, Path], repos: dict[str, str],
                                                 builds: list[dict[str, Any]], tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "old.safetensors"
    first = _attach(local, cache)
    _strip_commits(cache)
    assert "base_commit" not in AlignmentAnchors.load(cache).meta
    push_folder(local["base_v2"], "org/base", commit_message="base v2")  # undetectable without a commit
    n = len(builds)
    with caplog.at_level(logging.WARNING, logger=BINDING_LOG):
        again = _attach(local, cache)
    assert len(builds) == n
    assert all(torch.equal(first[k], again[k]) for k in first)
    warned = [r.getMessage() for r in caplog.records if "records no commit" in r.getMessage()]
    assert any("base model 'org/base'" in m for m in warned) and any("aligned model 'org/aligned'" in m for m in warned)
    assert all(str(cache) in m and "cannot be detected" in m for m in warned)


def test_offline_uses_the_cached_commit(hub: LocalHub, local: dict[str, Path], repos: dict[str, str],
                                        builds: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    from huggingface_hub import constants, snapshot_download

    cache = tmp_path / "anchors.safetensors"
    _attach(local, cache)
    _attach(local, cache)  # online check: the HF cache's refs/main now records the commit
    n = len(builds)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()
    _attach(local, cache)  # the same commit in the local HF cache: reused, without a request
    assert len(builds) == n and hub.requests == []

    # the local HF cache moved to a newer commit (a download while online): refused offline too
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    push_folder(local["base_v2"], "org/base", commit_message="base v2")
    new = hub.repos["org/base"].refs["main"]
    snapshot_download("org/base")
    snapshot_download("org/aligned")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.requests.clear()
    with pytest.raises(ConfigError, match=f"at commit {repos['base']}, but this run resolves it to commit {new}"):
        _attach(local, cache)
    # rebuilt offline from the cached snapshot, which records its commit
    _attach(local, cache, rebuild_stale=True)
    assert AlignmentAnchors.load(cache).meta["base_commit"] == new and hub.requests == []

    # nothing in the local HF cache for a repo: its commit cannot be checked; loaded, with a warning
    shutil.rmtree(Path(constants.HF_HUB_CACHE) / "models--org--aligned" / "refs")
    n = len(builds)
    with caplog.at_level(logging.WARNING, logger=BINDING_LOG):
        _attach(local, cache)
    assert len(builds) == n and hub.requests == []
    assert any("cannot check that the aligned model 'org/aligned' is still at commit" in r.getMessage() for r in caplog.records)
