"""Disk full (issue 35): a merge or a vector computation into a disk too small is refused before
any tensor is computed; a disk that fills during the write gives one line, leaves no temporary
folder and keeps the previous output. A real disk fills here: a small tmpfs mounted by the test
(root only; skipped, with the reason, where mounting is not allowed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from hf_safety_merge import SafetyMergeConfig, SafetyVector, merge
from hf_safety_merge.cli import main as cli_main
from hf_safety_merge.errors import DiskSpaceError
from hf_safety_merge.merge import engine
from hf_safety_merge.vectors import vector as vector_module

#: the tiny Llama's float32 weights take 3.3 MiB: this tmpfs cannot hold them
SMALL = "1m"


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of `size` at `path` for the block (unmounted after, whatever happens)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the tests as root)")
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command here")
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (a container without CAP_SYS_ADMIN?): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False, capture_output=True)


@pytest.fixture(scope="module")
def vec(llama_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vec") / "vec"
    SafetyVector.compute(llama_family["aligned"], llama_family["harmful"], out, progress=False, subspaces=False)
    return out


def _cfg(fam: dict[str, Path], vec: Path, out: Path, **kw: object) -> SafetyMergeConfig:
    return SafetyMergeConfig(task_model=str(fam["task"]), task_reference=str(fam["aligned"]), safety_vector=str(vec),
                             method="task_arithmetic", output_dir=str(out), **kw)  # type: ignore[arg-type]


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".lock")]


def test_disk_too_small_is_refused_before_any_tensor(llama_family: dict[str, Path], vec: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    computed: list[str] = []
    real = engine._global_pass
    monkeypatch.setattr(engine, "_global_pass", lambda *a, **k: computed.append("global") or real(*a, **k))
    with tmpfs(tmp_path / "disk", SMALL) as disk:
        out = disk / "patched"
        with pytest.raises(DiskSpaceError, match=rf"output folder {out}: needs 3\.3 MiB \([\d,]+ bytes\) but {disk} "
                                                 r"has only [\d.]+ KiB \([\d,]+ bytes\) free; free some space or choose another folder$"):
            merge(_cfg(llama_family, vec, out), progress=False)
        assert computed == [], "the free space must be checked before any tensor is computed"
        assert not out.exists() and _leftovers(disk) == []

        # the command line: one line, exit 2
        cfg_file = tmp_path / "merge.yaml"
        cfg_file.write_text(yaml.safe_dump({k: v for k, v in _cfg(llama_family, vec, out).__dict__.items()
                                            if k in ("task_model", "task_reference", "safety_vector", "method")}))
        assert cli_main(["merge", str(cfg_file), str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: output folder {out}: needs 3.3 MiB"), err
        assert not out.exists() and _leftovers(disk) == []


def test_vector_compute_too_small_is_refused(llama_family: dict[str, Path], tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", SMALL) as disk:
        out = disk / "vec"
        with pytest.raises(DiskSpaceError, match=rf"safety vector folder {out}: needs 4\.0 MiB .* free"):
            SafetyVector.compute(llama_family["aligned"], llama_family["harmful"], out, progress=False)
        assert not out.exists() and _leftovers(disk) == []


def test_disk_filling_during_the_write_keeps_the_previous_output(llama_family: dict[str, Path], vec: Path,
                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # The pre-check passes (disabled), so the write itself runs into the full disk.
    monkeypatch.setattr(engine, "check_free_space", lambda *a, **k: None)
    with tmpfs(tmp_path / "disk", SMALL) as disk:
        out = disk / "patched"
        out.mkdir()
        previous = {"model.safetensors": os.urandom(64 * 1024), "notes.txt": b"the user's previous merge\n"}
        for name, data in previous.items():
            (out / name).write_bytes(data)
        used_before = shutil.disk_usage(disk).used

        with pytest.raises(DiskSpaceError) as info:
            merge(_cfg(llama_family, vec, out, overwrite=True), progress=False)
        msg = str(info.value)
        assert "\n" not in msg
        assert msg.startswith(f"output folder {out}: the disk filled while writing (No space left on device;"), msg
        assert "the partial output was removed" in msg and f"{out} was left as it was" in msg

        assert {p.name: p.read_bytes() for p in out.iterdir()} == previous
        assert _leftovers(disk) == [], "the hidden temporary folder must be removed"
        assert shutil.disk_usage(disk).used <= used_before + 4096

        # the command line prints it as one line, without a traceback
        cfg_file = tmp_path / "merge.yaml"
        cfg_file.write_text(yaml.safe_dump({"task_model": str(llama_family["task"]),
                                            "task_reference": str(llama_family["aligned"]),
                                            "safety_vector": str(vec), "method": "task_arithmetic"}))
        assert cli_main(["merge", str(cfg_file), str(out), "--overwrite", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: output folder {out}: the disk filled while writing"), err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == previous and _leftovers(disk) == []


def test_vector_compute_disk_filling_during_the_write(llama_family: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vector_module, "check_free_space", lambda *a, **k: None)
    with tmpfs(tmp_path / "disk", SMALL) as disk:
        out = disk / "vec"
        with pytest.raises(DiskSpaceError, match=rf"^safety vector folder {out}: the disk filled while writing"):
            SafetyVector.compute(llama_family["aligned"], llama_family["harmful"], out, progress=False)
        assert not out.exists() and _leftovers(disk) == []


def test_trainer_save_checks_free_space_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AsFT / SafeKey / distillation trainers (ShardedTrainingMixin) refuse a save or a checkpoint
    the disk cannot hold, in one line naming the folder, before writing anything."""
    from collections import namedtuple

    from datasets import load_dataset
    from test_asft_training import lora_model, make_tiny_setup, make_tokenizer, train_args

    from hf_safety_merge.errors import DiskSpaceError
    from hf_safety_merge.io.output import space
    from hf_safety_merge.training import AsFTConfig, AsFTTrainer

    setup = make_tiny_setup(tmp_path / "setup", n_examples=8)
    trainer = AsFTTrainer(model=lora_model(setup["aligned"]), args=train_args(AsFTConfig, tmp_path / "run", max_steps=1,
                          asft_base_model=str(setup["base"])), train_dataset=load_dataset(str(setup["data"]), split="train"),
                          processing_class=make_tokenizer())
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(space.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(DiskSpaceError) as e:
        trainer.save_model(str(tmp_path / "adapter"))
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "AsFT: saving to" in msg and str(tmp_path / "adapter") in msg and "1,000 bytes" in msg
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()
