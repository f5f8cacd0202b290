"""Hub code paths over real HTTP against a local Hub double on 127.0.0.1 (never the real Hub)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from local_hub import LocalHub, point_hf_at
from naive_reference import load_state

from hf_safety_merge import (
    AutoSafeModelForCausalLM,
    CheckpointError,
    HubError,
    PlanError,
    SafetyMergeConfig,
    SafetyVector,
    merge,
    push_folder,
)

TOKEN = "hf_localTestToken0123456789abcdef"


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHub]:
    h = LocalHub(tmp_path / "hub-storage", token=TOKEN).start()
    env = point_hf_at(h, tmp_path, monkeypatch)
    h.env = env  # type: ignore[attr-defined]
    yield h
    h.stop()


def _upload(folder: Path, repo_id: str) -> None:
    push_folder(folder, repo_id, commit_message=f"upload {folder.name}")


@pytest.fixture
def hub_inputs(hub: LocalHub, llama_family_sharded: dict[str, Path], tmp_path: Path) -> dict[str, str]:
    vec = tmp_path / "vec"
    SafetyVector.compute(llama_family_sharded["aligned"], llama_family_sharded["harmful"], vec, progress=False)
    task = tmp_path / "task-with-extra"
    shutil.copytree(llama_family_sharded["task"], task)
    (task / "unused-big-file.bin").write_bytes(os.urandom(4096))  # must never be downloaded
    _upload(task, "user/task")
    _upload(llama_family_sharded["aligned"], "user/aligned")
    _upload(vec, "user/vector")
    hub.requests.clear()
    return {"task": "user/task", "aligned": "user/aligned", "vector": "user/vector"}


def test_end_to_end_merge_from_repo_ids_pushed_as_pr(hub: LocalHub, hub_inputs: dict[str, str], tmp_path: Path) -> None:
    cfg = tmp_path / "merge.yaml"
    cfg.write_text("task_model: user/task\ntask_reference: user/aligned\nsafety_vector: user/vector\nmethod: enchtable\n"
                   "push_to_hub: user/patched\ncreate_pr: true\n")
    main_before = None
    env = {**os.environ, **hub.env}  # type: ignore[attr-defined]
    r = subprocess.run([sys.executable, "-m", "hf_safety_merge.cli", "merge", str(cfg), "--out", str(tmp_path / "out"),
                        "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    logs = r.stdout + r.stderr
    assert r.returncode == 0, logs
    assert TOKEN not in logs
    assert "pushed as pull request: " in logs and "/discussions/1" in logs
    repo = hub.repos["user/patched"]
    assert set(repo.commits[repo.refs["main"]].files) == {".gitattributes"}  # PR only: main untouched
    pr_files = set(repo.commits[repo.refs["refs/pr/1"]].files)
    assert {"README.md", "config.json", "merge_report.json", "model.safetensors"} <= pr_files
    # only what was needed was fetched
    assert not any("unused-big-file" in p for _, p, _ in hub.requests)
    # headers were read with range requests before any full shard download of the task model
    shard_gets = [(p, rng) for m, p, rng in hub.requests if m == "GET" and "/user/task/resolve/" in p and p.endswith(".safetensors")]
    first_full = next(i for i, (_, rng) in enumerate(shard_gets) if not rng)
    assert all(rng for _, rng in shard_gets[:first_full]) and first_full >= 4
    del main_before

    from huggingface_hub import ModelCard, snapshot_download
    from transformers import AutoModelForCausalLM

    local = snapshot_download("user/patched", revision="refs/pr/1")
    model = AutoModelForCausalLM.from_pretrained(local)
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)
    for name, t in load_state(tmp_path / "out").items():
        assert torch.equal(load_state(Path(local))[name], t)
    card = ModelCard.load(Path(local) / "README.md")
    assert card.data.base_model[:2] == ["user/task", "user/aligned"] and card.data.base_model_relation == "merge"
    assert {"safety", "hf-safety-merge", "enchtable"} <= set(card.data.tags)
    assert "user/vector" in card.text and TOKEN not in card.text


def test_validation_happens_before_any_weight_download(hub: LocalHub, hub_inputs: dict[str, str], tmp_path: Path, llama_family: dict[str, Path]) -> None:
    from hf_safety_merge.testing.models import make_family

    qwen = make_family(tmp_path / "qwen", "qwen2")
    qv = tmp_path / "qvec"
    SafetyVector.compute(qwen["aligned"], qwen["harmful"], qv, progress=False)
    _upload(qv, "user/qwen-vector")
    hub.requests.clear()
    with pytest.raises(PlanError, match="architecture mismatch"):
        merge(SafetyMergeConfig(task_model="user/task", task_reference="user/aligned", safety_vector="user/qwen-vector",
                                output_dir=str(tmp_path / "o")), progress=False)
    full = [p for m, p, rng in hub.requests if m == "GET" and p.endswith(".safetensors") and not rng]
    assert full == [], full
    assert not (tmp_path / "o").exists()


def test_auto_safe_model_equals_on_disk_merge_bit_for_bit(hub: LocalHub, hub_inputs: dict[str, str], tmp_path: Path) -> None:
    cfg = SafetyMergeConfig(task_model="user/task", task_reference="user/aligned", safety_vector="user/vector",
                            method="enchtable", output_dir=str(tmp_path / "disk"))
    merge(cfg, progress=False)
    model = AutoSafeModelForCausalLM.from_pretrained("user/task", merge_config=cfg, progress=False)
    disk = load_state(tmp_path / "disk")
    state = model.state_dict()
    for name, t in disk.items():
        assert torch.equal(state[name], t), name
    assert model.safety_merge_result.summary["alpha"] > 0
    # the mixin method works on a plain model, too (task_arithmetic, local vector object)
    from transformers import AutoModelForCausalLM

    from hf_safety_merge import add_safety_vector_support

    plain = add_safety_vector_support(AutoModelForCausalLM.from_pretrained(tmp_path / "disk"))
    vec = SafetyVector.from_pretrained("user/vector")
    before = plain.model.layers[0].mlp.up_proj.weight.detach().clone()
    plain.load_safety_vector(vec, method="task_arithmetic", parameters={"beta": 0.5}, progress=False)
    torch.testing.assert_close(plain.model.layers[0].mlp.up_proj.weight, before + 0.5 * vec["model.layers.0.mlp.up_proj.weight"])
    assert plain.config.architectures == ["LlamaForCausalLM"]


def test_upload_dropped_midway_leaves_repo_unchanged(hub: LocalHub, llama_family_sharded: dict[str, Path]) -> None:
    _upload(llama_family_sharded["aligned"], "user/target")
    repo = hub.repos["user/target"]
    main_before = repo.refs["main"]
    hub.fail_uploads = 100
    with pytest.raises(HubError) as e:
        push_folder(llama_family_sharded["task"], "user/target")
    msg = str(e.value)
    assert "Nothing was committed" in msg and "hf-safety-merge push" in msg and TOKEN not in msg
    assert repo.refs["main"] == main_before
    hub.fail_uploads = 0
    info = push_folder(llama_family_sharded["task"], "user/target")
    assert repo.refs["main"] == info.oid != main_before


def test_write_without_token_is_rejected(hub: LocalHub, llama_family: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_TOKEN_PATH", str(Path(hub.env["HF_HOME"]) / "no-token"))  # type: ignore[attr-defined]
    with pytest.raises(HubError, match="user/anon"):
        push_folder(llama_family["task"], "user/anon", token=None)
    assert "user/anon" not in hub.repos


def test_stale_parent_and_unknown_revision_are_rejected(hub: LocalHub, llama_family: dict[str, Path]) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    api.create_repo("user/r")
    first = api.create_commit("user/r", [CommitOperationAdd("a.txt", b"a")], commit_message="a")
    api.create_commit("user/r", [CommitOperationAdd("b.txt", b"b")], commit_message="b")
    with pytest.raises(HfHubHTTPError):
        api.create_commit("user/r", [CommitOperationAdd("c.txt", b"c")], commit_message="c", parent_commit=first.oid)
    with pytest.raises(CheckpointError, match="revision"):
        SafetyVector.from_pretrained("user/r", revision="no-such-branch")


def test_vector_push_and_load_round_trip(hub: LocalHub, llama_family: dict[str, Path], tmp_path: Path) -> None:
    v = SafetyVector.compute(llama_family["aligned"], llama_family["harmful"], progress=False)
    info = v.push_to_hub("user/vec2", create_pr=False)
    assert info.oid == hub.repos["user/vec2"].refs["main"]
    back = SafetyVector.from_pretrained("user/vec2")
    assert set(back.keys()) == set(v.keys())
    for k in v:
        assert torch.equal(back[k], v[k])
    files = set(hub.repos["user/vec2"].commits[info.oid].files)
    assert {"safety_vector.safetensors", "safety_vector_config.json", "README.md"} <= files


def test_offline_mode_reads_from_cache(hub: LocalHub, hub_inputs: dict[str, str], tmp_path: Path) -> None:
    cfg = SafetyMergeConfig(task_model="user/task", task_reference="user/aligned", safety_vector="user/vector",
                            method="task_arithmetic", output_dir=str(tmp_path / "online"))
    merge(cfg, progress=False)
    # fill the cache completely (snapshot), then go offline
    from huggingface_hub import constants, snapshot_download

    for r in ("user/task", "user/vector"):
        snapshot_download(r)
    hub.stop()
    env = {**os.environ, **hub.env, "HF_HUB_OFFLINE": "1"}  # type: ignore[attr-defined]
    y = tmp_path / "m.yaml"
    y.write_text("task_model: user/task\nsafety_vector: user/vector\nmethod: task_arithmetic\n")
    r = subprocess.run([sys.executable, "-m", "hf_safety_merge.cli", "merge", str(y), "--out", str(tmp_path / "offline"),
                        "--no-progress"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    a, b = load_state(tmp_path / "online"), load_state(tmp_path / "offline")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert constants.HF_HUB_OFFLINE is False
    assert json.loads((tmp_path / "offline" / "merge_report.json").read_text())["task_model"] == "user/task"


def test_auto_safe_model_uses_the_vectors_aligned_model_and_the_config(
    hub: LocalHub, hub_inputs: dict[str, str], llama_family_sharded: dict[str, Path], tmp_path: Path,
) -> None:
    """Like PeftModel.from_pretrained: the vector's recorded aligned_model is the default task
    reference; merge_config.task_model and safety_vector_revision are honoured."""
    from hf_safety_merge.errors import ConfigError

    rev_a = hub.repos["user/vector"].refs["main"]
    vec_b = tmp_path / "vec-b"  # a different vector on top of main: only the pinned revision may be used
    SafetyVector.compute(llama_family_sharded["aligned"], llama_family_sharded["task"], vec_b, progress=False)
    _upload(vec_b, "user/vector")
    assert hub.repos["user/vector"].refs["main"] != rev_a
    merge(SafetyMergeConfig(task_model="user/task", task_reference="user/aligned", safety_vector=str(tmp_path / "vec"),
                            method="enchtable", output_dir=str(tmp_path / "disk")), progress=False)
    cfg = SafetyMergeConfig(task_model="user/task", safety_vector="user/vector", safety_vector_revision=rev_a)
    model = AutoSafeModelForCausalLM.from_pretrained(merge_config=cfg, progress=False)  # no task_reference anywhere
    state = model.state_dict()
    for name, t in load_state(tmp_path / "disk").items():
        assert torch.equal(state[name], t), name
    model2 = AutoSafeModelForCausalLM.from_pretrained("user/task", safety_vector="user/vector",
                                                      safety_vector_revision=rev_a, progress=False)
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ConfigError, match=r"merge_config\.task_model"):
        AutoSafeModelForCausalLM.from_pretrained("user/aligned", merge_config=cfg, progress=False)


def test_push_cli_follows_hf_upload(hub: LocalHub, llama_family: dict[str, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from hf_safety_merge.cli import main

    folder = tmp_path / "patched"
    shutil.copytree(llama_family["task"], folder)
    (folder / "extra.bin").write_bytes(b"x")
    assert main(["push", "user/p", str(folder), "--commit-message", "safety patch", "--commit-description",
                 "why", "--exclude", "*.bin", "--token", TOKEN]) == 0
    out = capsys.readouterr()
    assert "pushed" in out.out and TOKEN not in out.out + out.err and "deprecated" not in out.err
    commit = hub.repos["user/p"].commits[hub.repos["user/p"].refs["main"]]
    assert commit.message == "safety patch" and "config.json" in commit.files and "extra.bin" not in commit.files
    assert main(["push", "user/only-json", str(folder), "--include", "*.json"]) == 0
    files = hub.repos["user/only-json"].commits[hub.repos["user/only-json"].refs["main"]].files
    assert files and all(f.endswith(".json") for f in files if f != ".gitattributes")
    capsys.readouterr()
    # the old order still works, with a deprecation note
    assert main(["push", str(folder), "user/old", "--message", "old style"]) == 0
    err = capsys.readouterr().err
    assert "deprecated" in err and "hf-safety-merge push user/old" in err
    assert hub.repos["user/old"].commits[hub.repos["user/old"].refs["main"]].message == "old style"
