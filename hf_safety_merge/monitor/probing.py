"""One probe run of the safety monitor, its two halves: generate the probe responses on the model
being trained (the engines below), and judge them into rates.

Layer 5 (docs/architecture.md): imports ``eval`` and ``training.sharding`` (layer 2); the callback
(:mod:`.callback`) runs these and keeps the curve.

Engines. In one process the model generates everything. With several processes (DDP, FSDP2),
every process generates its share of the probes on its own model (each rank gets the same number
of rows, padded, and the same number of batches); under FSDP2 the root's parameters are unsharded
for the probe and ``generate(synced_gpus=True)`` keeps every rank stepping until all are done, so
the per-layer all-gathers never wait for a rank that stopped early. The rows are gathered, the main
process judges, and the result is broadcast, so every rank logs the same point and takes the same
decision (``stop`` ends training on every rank at the same step). With a user backend (e.g. a
server) the main process generates everything and the others wait at the broadcast. During a probe
the model is in eval mode (no dropout, no gradient checkpointing) and ``use_cache`` is on; its
training mode is restored after.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ..eval.backends import TransformersBackend
from ..eval.generation import GenerationRequest, GenerationSettings, Generator
from ..eval.judges import Judge
from ..eval.metrics import exact_match, rate
from .config import SafetyMonitorConfig
from .probes import ProbeSet

__all__ = ["ProbeBackend", "generate_probes", "rank_world", "score_rows", "shard_info"]


class ProbeBackend(TransformersBackend):
    """The transformers backend for probes on a model that is being trained: left-padded
    ``generate`` under ``no_grad`` (not ``inference_mode``, whose tensors FSDP2 cannot reuse as
    gathered weights in the next training step), ``use_cache`` forced on (trainers turn it off for
    gradient checkpointing), the shared-prefix cache in one process or DDP, and ``synced_gpus``
    (without the prefix cache, whose extra forwards would differ between ranks) when the weights
    are sharded."""

    def __init__(self, model: Any, tokenizer: Any, synced: bool = False) -> None:
        super().__init__(model, tokenizer)
        self.synced = synced

    def _generate_kwargs(self, config: GenerationSettings) -> dict[str, Any]:
        kw = super()._generate_kwargs(config)
        kw["use_cache"] = True
        if self.synced:
            kw["synced_gpus"] = True
        return kw

    def _grad_mode(self) -> Any:
        return torch.no_grad()

    def _prefix_cache_allowed(self) -> bool:
        # the shared opening (e.g. the chat template's system prompt) computed once per probe,
        # except when sharded: its extra forwards would differ between ranks
        return not self.synced


def rank_world() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 without torch.distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_info(model: Any) -> dict[str, Any] | None:
    """Placements and shapes of the first sharded parameter (what a probe ran on)."""
    from torch.distributed.tensor import DTensor

    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            return {"param": name, "placements": [str(x) for x in p.placements], "global_shape": list(p.shape),
                    "local_shape": list(p.to_local().shape)}
    return None


def generate_probes(
    model: Any, tok: Any, requests: list[GenerationRequest], config: SafetyMonitorConfig,
) -> tuple[list[dict[str, Any]] | None, str, dict[str, Any] | None]:
    """Rows in request order on the main process (None elsewhere), the engine used, and (under
    FSDP2 with several processes) the placements and shapes of a sharded parameter probed."""
    import torch.distributed as dist

    from ..training.sharding import has_dtensor_params

    rank, world = rank_world()
    gcfg = config.generation_config()
    sharding: dict[str, Any] | None = None
    sharded = has_dtensor_params(model)
    was_training = model.training
    model.eval()
    root_unsharded = False
    try:
        if config.backend is not None:
            engine = "backend on main"
            rows = None
            if rank == 0:
                gen = Generator(None, tok, gcfg, model_name="safety-monitor", backend=config.backend(model, tok))
                rows = gen.generate(requests, progress=False)
            return rows, engine, sharding
        if world == 1:
            gen = Generator(model, tok, gcfg, model_name="safety-monitor", backend=ProbeBackend(model, tok))
            return gen.generate(requests, progress=False), "sharded" if sharded else "single", sharding
        # every rank its share, the same number of rows and batches on every rank
        per = math.ceil(len(requests) / world)
        mine = list(requests[rank::world])
        while len(mine) < per:
            pad = mine[-1] if mine else requests[-1]
            mine.append(dataclasses.replace(pad, id=f"{pad.id}#pad{len(mine)}"))
        if sharded:
            from torch.distributed.fsdp import FSDPModule

            sharding = shard_info(model)
            gcfg = dataclasses.replace(gcfg, max_batch_tokens=None)  # the same number of batches on every rank
            root: Any = model
            if isinstance(model, FSDPModule):  # narrows `model` only; `root` stays a Module
                # one token through the root first: FSDP2 initialises its states from the root's
                # forward, which generate() of a PEFT root never calls (and the start probe runs
                # before any training step); then the root's own weights (embeddings, head) stay
                # gathered for the probe, and each layer gathers its own in its forward
                with torch.no_grad():
                    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
                    root(input_ids=torch.tensor([[int(pad or 0)]], device=next(iter(root.parameters())).device))
                root.unshard()
                root_unsharded = True
        gen = Generator(model, tok, gcfg, model_name="safety-monitor", backend=ProbeBackend(model, tok, synced=sharded))
        local = gen.generate(mine, progress=False)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, [r for r in local if "#pad" not in r["id"]])
        engine = f"fsdp2 sharded x{world}" if sharded else f"data-parallel x{world}"
        if rank != 0:
            return None, engine, sharding
        by_id = {r["id"]: r for part in gathered for r in part}
        return [by_id[r.id] for r in requests], engine, sharding
    finally:
        if root_unsharded:
            model.reshard()
        model.train(was_training)


def score_rows(rows: list[dict[str, Any]], judge: Judge, rjudge: Judge | None, probes: ProbeSet,
               task_metric: str) -> dict[str, Any]:
    """Judge one probe run's rows: the unsafe rate (and its per-probe flags), the over-refusal on
    the benign probes, the task score."""
    by_set: dict[str, list[dict[str, Any]]] = {"harmful": [], "benign": [], "task": []}
    for r in rows:
        by_set[str(r["set"])].append(r)
    h = by_set["harmful"]
    verdicts = judge.judge_batch([r["prompt"] for r in h], [r["response"] for r in h])
    unsafe_flags = [judge.is_unsafe(v) for v in verdicts]
    out: dict[str, Any] = {"unsafe": rate(unsafe_flags).to_dict(), "unsafe_flags": [int(f) for f in unsafe_flags],
                           "labels": [v.label for v in verdicts], "over_refusal": None, "task": None,
                           "responses": [r["response"] for r in rows]}
    if by_set["benign"] and rjudge is not None:
        bv = rjudge.judge_batch([r["prompt"] for r in by_set["benign"]], [r["response"] for r in by_set["benign"]])
        out["over_refusal"] = rate(rjudge.is_refusal(v) for v in bv).to_dict()
    if by_set["task"]:
        mode = "number" if task_metric == "number" else "normalized"
        refs = [probes.task[int(r["index"])].reference or "" for r in by_set["task"]]
        out["task"] = rate(exact_match(r["response"], ref, mode=mode) for r, ref in zip(by_set["task"], refs)).to_dict()
    return out
