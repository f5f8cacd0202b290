from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_safety_merge.errors import CheckpointError
from hf_safety_merge.io.safetensors_stream import (
    TORCH_TO_TAG,
    OutputTensor,
    StreamingShardWriter,
    TensorReader,
    parse_size,
    read_safetensors_header,
)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(17, 5, generator=g),
        "b.bias": torch.randn(3, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(4, 4, generator=g).to(torch.float16),
        "d.ids": torch.arange(7, dtype=torch.int64),
        "e.scalar": torch.tensor(3.5),
        "f.empty": torch.zeros(0, 4),
        "g.bool": torch.tensor([True, False, True]),
    }


@pytest.mark.parametrize("shard", ["1KB", "100B", "10GB"])
def test_streaming_writer_round_trips_with_safetensors(tmp_path: Path, shard: str) -> None:
    ts = _tensors()
    specs = [OutputTensor(k, TORCH_TO_TAG[v.dtype], tuple(v.shape)) for k, v in ts.items()]
    w = StreamingShardWriter(tmp_path, specs, shard)
    for k, v in ts.items():
        w.write(k, v)
    files = w.close()
    got: dict[str, torch.Tensor] = {}
    for f in files:
        if f.endswith(".safetensors"):
            got.update(load_file(tmp_path / f))
            # each shard's blocks are reserved up front: the file is exactly header + data
            infos, _ = read_safetensors_header(tmp_path / f)
            assert (tmp_path / f).stat().st_size == max((i.end for i in infos.values()), default=0) or not infos
            with safe_open(tmp_path / f, "pt") as fh:
                assert fh.metadata() == {"format": "pt"}
    assert set(got) == set(ts)
    for k in ts:
        assert got[k].dtype == ts[k].dtype and torch.equal(got[k], ts[k]), k
    if len(files) > 1:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(ts)
        assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
    else:
        assert files == ["model.safetensors"]


def test_reader_matches_safetensors(tmp_path: Path) -> None:
    ts = _tensors()
    save_file(ts, tmp_path / "x.safetensors")
    infos, _meta = read_safetensors_header(tmp_path / "x.safetensors")
    with TensorReader() as r:
        for k, v in ts.items():
            assert torch.equal(r.read(infos[k]), v), k


def test_writer_enforces_plan_order_and_shapes(tmp_path: Path) -> None:
    specs = [OutputTensor("a", "F32", (2,)), OutputTensor("b", "F32", (3,))]
    w = StreamingShardWriter(tmp_path, specs)
    with pytest.raises(RuntimeError, match="plan order"):
        w.write("b", torch.zeros(3))
    with pytest.raises(RuntimeError, match="planned"):
        w.write("a", torch.zeros(5))
    w.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="before all tensors"):
        w.close()


def test_truncated_file_is_detected_from_the_header(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64)}, f)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*'w'.*truncated"):
        read_safetensors_header(f)
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="too small"):
        read_safetensors_header(f)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_safetensors_header(f)


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("200KB") == 200_000
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="cannot parse"):
        parse_size("lots")


def _mappings() -> int:
    return sum(1 for _ in open("/proc/self/maps"))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="counts mappings in /proc (Linux)")
def test_mapped_reads_equal_copies_never_write_the_file_and_are_released(tmp_path: Path) -> None:
    """`read(mapped=True)` (what a merge uses for the safety vector and the reference) gives the
    same values as a copying read; writing to it copies the page (the file is unchanged); it
    outlives the reader; its mapping goes away with the tensor."""
    ts = _tensors()
    f = tmp_path / "model.safetensors"
    save_file(ts, str(f))
    before = f.read_bytes()
    infos, _ = read_safetensors_header(f)
    base = _mappings()
    with TensorReader() as r:
        views = {k: r.read(i, mapped=True) for k, i in infos.items()}
        for k, i in infos.items():
            assert torch.equal(views[k], r.read(i)) and views[k].dtype == ts[k].dtype, k
    assert _mappings() >= base + 5  # one per non-empty tensor
    views["a.weight"].add_(1.0)  # after the reader closed its files
    assert torch.equal(views["a.weight"], ts["a.weight"] + 1.0)
    assert f.read_bytes() == before
    views.clear()
    assert _mappings() <= base


def test_mapped_read_of_a_file_cut_short_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(f))
    infos, _ = read_safetensors_header(f)
    with TensorReader() as r:
        r.read(infos["w"], mapped=True)
        with open(f, "r+b") as fh:  # cut short after the header was checked
            fh.truncate(f.stat().st_size - 100)
        with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected end of file.*'w'"):
            r.read(infos["w"], mapped=True)
