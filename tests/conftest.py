"""Shared fixtures: tiny real checkpoints of three architectures, the real SmolLM2, data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hf_safety_merge.assets import data_dir, smollm2_checkpoint
from hf_safety_merge.testing.models import ARCHS, make_family


def pytest_report_header(config: pytest.Config) -> str:
    """Free disk where the tests write: a test that fails writing a checkpoint on a nearly full
    disk reads as a merge bug unless the log says how much room there was."""
    import shutil
    import tempfile

    free = shutil.disk_usage(tempfile.gettempdir()).free / 2**30
    return f"free disk in {tempfile.gettempdir()}: {free:.1f} GiB (the suite needs about 2.5 GiB at a time)"


@pytest.fixture(scope="session", params=ARCHS)
def tiny_family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base / aligned / harmful / task checkpoints of one tiny architecture (unsharded)."""
    root = tmp_path_factory.mktemp(f"family-{request.param}")
    paths = make_family(root, request.param, seed=0)
    paths["arch"] = Path(request.param)
    return paths


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_family(tmp_path_factory.mktemp("family-llama"), "llama", seed=0)


@pytest.fixture(scope="session")
def llama_family_sharded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same tiny Llama family, saved in ~200 KB shards (several files plus an index)."""
    return make_family(tmp_path_factory.mktemp("family-llama-sharded"), "llama", seed=0, max_shard_size="200KB")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct, converted once from GGUF to safetensors and cached."""
    try:
        return smollm2_checkpoint()
    except RuntimeError as e:  # package not installed: a user's checkout may lack it; CI installs it
        if os.environ.get("CI"):
            pytest.fail(f"CI must have the real model: {e}")
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = data_dir()
    if not d.is_dir():  # CI always has ../shared/data beside the checkout
        if os.environ.get("CI"):
            pytest.fail(f"CI must have the public data folder at {d} (set HF_SAFETY_DATA_DIR)")
        pytest.skip(f"public data folder not found at {d} (set HF_SAFETY_DATA_DIR)")
    return d


@pytest.fixture(scope="session")
def toy_space_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Space folder whose `toy-v<VERSION>` is the toy family (hf_safety_merge.demo.toy_models) in the
    library cache, the one `demo --quick` uses: built once per machine, shared by the Space, demo
    and calibration tests."""
    from hf_safety_merge.assets import default_cache_dir
    from hf_safety_merge.demo import toy_models

    cached = default_cache_dir() / f"toy-v{toy_models.VERSION}"
    toy_models.build_toy_family(cached)
    d = tmp_path_factory.mktemp("space-dir")
    (d / f"toy-v{toy_models.VERSION}").symlink_to(cached, target_is_directory=True)
    return d
