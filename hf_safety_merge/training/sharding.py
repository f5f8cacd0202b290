"""Sharded training engines for this library's trainers: which engine a run uses, FSDP2 on CPU
(gloo) where accelerate would silently fall back to DDP, the row shards of FSDP2's DTensor
parameters, and the autograd-aware collectives AsFT's sharded penalty is built from.

Engines and who supports what (docs/asft.md, docs/safekey.md, docs/distillation.md):

| engine | AsFT | SafeKey | distillation |
| --- | --- | --- | --- |
| one process, DDP | yes | yes | yes |
| FSDP2 (`fully_shard`; accelerate `fsdp_version: 2`; TRL `--fsdp ... --fsdp_config '{"version": 2}'`) | yes, anchors sharded like the LoRA weights | refused at start-up | refused at start-up |
| FSDP1 | refused at start-up | refused at start-up | refused at start-up |
| DeepSpeed ZeRO-1/2 | as DDP (parameters whole) | as DDP | as DDP |
| DeepSpeed ZeRO-3 | yes, anchors sharded by rows (`training.asft.zero3`) | refused at start-up | refused at start-up |

FSDP2 on CPU: `accelerate` only turns FSDP on for accelerator devices; on CPU a `--fsdp` run
becomes plain DDP without a word (the LoRA weights stay whole `Parameter`s). The trainers here
apply `torch.distributed.fsdp.fully_shard` themselves in that case (each decoder layer, then the
root, over a 1-D gloo mesh), so a CPU launch really shards and tests what a GPU launch runs.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError
from ..io.output import check_free_space

logger = logging.getLogger(__name__)

#: bytes sent by this module's collectives in this process (a counter for benchmarks and tests:
#: each all_gather / all_reduce adds the bytes of the tensor this rank contributes)
COMM_BYTES = {"forward": 0, "backward": 0}


def reset_comm_bytes() -> None:
    COMM_BYTES["forward"] = 0
    COMM_BYTES["backward"] = 0


# ---------------------------------------------------------------------------------------------
# Which engine
# ---------------------------------------------------------------------------------------------


def fsdp_version(args: Any) -> int | None:
    """The FSDP version a `TrainingArguments` asks for (`--fsdp` with `fsdp_config`'s `version`),
    or None when it asks for none. Transformers' default version is 1."""
    if not getattr(args, "fsdp", None):
        return None
    cfg = getattr(args, "fsdp_config", None) or {}
    return int(cfg.get("version", cfg.get("fsdp_version", 1)))


def _deepspeed_stage(trainer: Any) -> int | None:
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    cfg = getattr(plugin, "deepspeed_config", None) or {}
    return int(cfg.get("zero_optimization", {}).get("stage", 0) or 0)


def has_dtensor_params(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def training_engine(trainer: Any) -> str:
    """`"fsdp2"`, `"fsdp1"`, `"deepspeed-zero3"`, `"deepspeed"`, `"ddp"` or `"single"`: the engine a
    trainer's run uses, from its arguments, its accelerator and its model's parameters."""
    stage = _deepspeed_stage(trainer)
    if stage is not None:
        return "deepspeed-zero3" if stage == 3 else "deepspeed"
    acc = trainer.accelerator
    if getattr(trainer, "is_fsdp_enabled", False):
        return "fsdp2" if getattr(acc, "is_fsdp2", False) else "fsdp1"
    version = fsdp_version(trainer.args)
    if version is not None:
        return "fsdp2" if version == 2 else "fsdp1"
    if has_dtensor_params(trainer.model):
        return "fsdp2"
    return "ddp" if acc.num_processes > 1 else "single"


# ---------------------------------------------------------------------------------------------
# FSDP2 on CPU
# ---------------------------------------------------------------------------------------------


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP2 shards one by one: those whose class the transformers model names in
    `_no_split_modules` (its decoder layers), found through a PEFT wrapper."""
    inner: Any = model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]
    names = set(getattr(inner, "_no_split_modules", None) or [])
    if not names:
        raise ConfigError(f"{type(inner).__name__} names no decoder layer class (_no_split_modules); cannot apply FSDP2 per layer")
    return [m for m in model.modules() if type(m).__name__ in names]


def apply_fsdp2(model: torch.nn.Module, reshard_after_forward: bool = True) -> int:
    """`fully_shard` each decoder layer, then the root, over a 1-D mesh of every process (gloo on
    CPU). Returns the number of layers sharded. The process group must be initialised."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = "cpu" if not torch.cuda.is_available() else "cuda"
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return len(layers)


class ShardedTrainingMixin:
    """For this library's `Trainer` subclasses: checks the training engine at start-up and makes
    FSDP2 real on CPU.

    Subclasses set `sharding_method` (a name for messages), `supports_fsdp2` and `supports_zero3`. At the end of
    `__init__` they call :meth:`_setup_sharding`: an engine the trainer cannot train exactly under
    is refused with one line that says which engine to use instead; FSDP2 asked for on a CPU launch
    is applied here (see the module docstring). Under FSDP2 the saved model is gathered from the
    shards (the trainable parameters only, e.g. a LoRA adapter).
    """

    sharding_method: str = "this trainer"
    supports_fsdp2: bool = False
    supports_zero3: bool = False
    #: the engine found at start-up (see :func:`training_engine`)
    training_engine: str = "single"
    _sharded_here: bool = False

    @classmethod
    def _refuse_early(cls, args: Any) -> None:
        """What the arguments alone rule out, before the Trainer builds its accelerator (FSDP1 on
        CPU fails inside accelerate with a message about `sync_module_states`)."""
        if fsdp_version(args) == 1:
            raise ConfigError(
                f"{cls.sharding_method} does not support FSDP1 (it keeps the weights as flat shards outside the forward pass); "
                + ("use FSDP2 (fsdp_config: {version: 2}; accelerate: --fsdp_version 2) or DDP" if cls.supports_fsdp2 else
                   "launch it with DDP (accelerate launch --num_processes N, without --use_fsdp / --fsdp)")
            )
        if fsdp_version(args) == 2 and not cls.supports_fsdp2:
            raise ConfigError(
                f"{cls.sharding_method} does not support FSDP2 (sharded weights); launch it with DDP "
                "(accelerate launch --num_processes N, without --use_fsdp / --fsdp) or DeepSpeed ZeRO-2"
            )

    def _setup_sharding(self) -> None:
        t: Any = self
        engine = training_engine(t)
        what = self.sharding_method
        if engine == "fsdp1":
            raise ConfigError(
                f"{what} does not support FSDP1 (it keeps the weights as flat shards outside the forward pass); "
                "use FSDP2 (fsdp_config: {version: 2}; accelerate: --fsdp_version 2) or DDP"
            )
        if engine == "deepspeed-zero3" and not self.supports_zero3:
            raise ConfigError(
                f"{what} does not support DeepSpeed ZeRO-3 (parameters are partitioned outside the forward pass); "
                + ("use FSDP2 (accelerate launch --use_fsdp --fsdp_version 2) or ZeRO-2" if self.supports_fsdp2 else "use DDP or ZeRO-2")
            )
        if engine == "fsdp2" and not self.supports_fsdp2:
            raise ConfigError(
                f"{what} does not support FSDP2 (sharded weights); launch it with DDP "
                "(accelerate launch --num_processes N, without --use_fsdp / --fsdp) or DeepSpeed ZeRO-2"
            )
        self.training_engine = engine
        if engine != "fsdp2" or getattr(t, "is_fsdp_enabled", False):
            return  # nothing to do here: no FSDP, or accelerate applies FSDP2 itself (accelerator devices)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            raise ConfigError(f"{what}: FSDP2 needs a distributed launch of 2 or more processes (torchrun / accelerate launch)")
        if t.args.save_strategy != "no" and not t.args.save_only_model:
            raise ConfigError(
                f"{what} under FSDP2 on CPU saves no sharded optimizer state: set save_only_model=true or save_strategy=no"
            )
        if not has_dtensor_params(t.model):
            reshard = bool((t.args.fsdp_config or {}).get("reshard_after_forward", True))
            n = apply_fsdp2(t.model, reshard_after_forward=reshard)
            logger.info("%s: FSDP2 over %d processes (%s): fully_shard on %d decoder layers and the root",
                        what, dist.get_world_size(), dist.get_backend(), n)
        # The model owns its sharding and gradient reduction: the Trainer must not wrap it in DDP
        # (the same switch transformers uses for models it sharded at load time).
        t.is_distributed_loading_by_transformers = True
        self._sharded_here = True

    @contextlib.contextmanager
    def _defer_fsdp_gradient_reduction(self) -> Iterator[None]:
        """`no_sync` for gradient accumulation on a model sharded here (transformers' version reads
        a `distributed_config` only models sharded at load time have)."""
        t: Any = self
        if not self._sharded_here:
            with super()._defer_fsdp_gradient_reduction():  # type: ignore[misc]
                yield
            return
        t.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            t.model.set_requires_gradient_sync(True)

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        t: Any = self
        if self._sharded_here and state_dict is None:
            state_dict = gathered_trainable_state(t.model)  # a collective: every rank runs it
        if t.args.should_save:
            check_free_space(output_dir or t.args.output_dir, _saved_bytes(t.model), f"{self.sharding_method}: saving to")
        super()._save(output_dir, state_dict=state_dict)  # type: ignore[misc]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """A checkpoint holds the saved weights and the optimiser state: check the free space for
        both before writing either (one line naming the folder, the bytes needed and free)."""
        t: Any = self
        if t.args.should_save:
            opt = 0
            if t.optimizer is not None and not t.args.save_only_model:
                for st in t.optimizer.state.values():
                    opt += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
            check_free_space(t.args.output_dir, _saved_bytes(t.model) + opt, f"{self.sharding_method}: checkpoint in")
        super()._save_checkpoint(model, trial)  # type: ignore[misc]


def _saved_bytes(model: torch.nn.Module) -> int:
    """What `save_model` writes: a PEFT model's adapter (its trainable weights), else every weight."""
    peft = hasattr(model, "peft_config")
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad or not peft)


def gathered_trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (a LoRA adapter), whole, on CPU, keyed as in `state_dict()`: every
    rank must call it (each sharded tensor is all-gathered)."""
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        full = p.full_tensor() if isinstance(p, DTensor) else p
        out[name] = full.detach().cpu().clone()
    return out


# ---------------------------------------------------------------------------------------------
# Row shards and differentiable collectives
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowShard:
    """This process's rows `[start, stop)` of a tensor of `rows` rows sharded on dim 0 over
    `group` (`world` processes; `torch.chunk` sizes, as DTensor's `Shard(0)` and FSDP2 use)."""

    start: int
    stop: int
    rows: int
    rank: int
    world: int
    group: Any

    @property
    def chunk(self) -> int:
        return math.ceil(self.rows / self.world)

    def span(self, rank: int) -> tuple[int, int]:
        s = min(self.rows, rank * self.chunk)
        return s, min(self.rows, s + self.chunk)


def chunk_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """Rows `[start, stop)` that `Shard(0)` gives `rank` of `world` (torch.chunk sizes)."""
    c = math.ceil(rows / world)
    s = min(rows, rank * c)
    return s, min(rows, s + c)


def row_shard(t: torch.Tensor, what: str = "tensor") -> RowShard | None:
    """The row shard of a DTensor sharded on dim 0 over a 1-D mesh (FSDP2's layout), None for a
    plain or replicated tensor; any other layout is a one-line error naming `what`."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(t, DTensor):
        return None
    places = tuple(t.placements)
    if all(isinstance(p, Replicate) for p in places):
        return None
    mesh = t.device_mesh
    if mesh.ndim != 1 or not (isinstance(places[0], Shard) and places[0].dim == 0):
        raise ConfigError(
            f"{what}: placements {places} on a {mesh.ndim}-D mesh; AsFT's sharded penalty supports FSDP2's Shard(0) on a 1-D mesh"
        )
    rank, world = mesh.get_local_rank(), mesh.size()
    start, stop = chunk_rows(int(t.shape[0]), rank, world)
    local = t.to_local()
    if local.shape[0] != stop - start:
        raise ConfigError(f"{what}: local shard has {local.shape[0]} rows, expected {stop - start} (Shard(0) chunks)")
    return RowShard(start, stop, int(t.shape[0]), rank, world, mesh.get_group())


def _same_group(shards: list[RowShard]) -> Any:
    groups = {id(s.group) for s in shards}
    if len(groups) != 1:
        raise ConfigError("AsFT's sharded penalty needs every LoRA weight sharded over one process group (one FSDP2 mesh)")
    return shards[0].group


class _GatherRows(torch.autograd.Function):
    """Forward: whole tensors from each process's rows, all in one all_gather (each rank's rows
    padded to the chunk size, so every rank sends the same count). Backward: the gradient of the
    sum over processes of their losses, so the incoming gradients are summed over processes (one
    all_reduce) and each process keeps its rows."""

    @staticmethod
    def forward(ctx: Any, shards: list[RowShard], *locals_: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.shards = shards
        group, world = _same_group(shards), shards[0].world
        flats = []
        for s, t in zip(shards, locals_):
            pad = s.chunk - t.shape[0]
            buf = t if pad == 0 else torch.cat([t, t.new_zeros((pad, *t.shape[1:]))])
            flats.append(buf.reshape(-1))
        send = torch.cat(flats)
        parts = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(parts, send, group=group)
        COMM_BYTES["forward"] += send.numel() * send.element_size()
        outs = []
        offset = 0
        for s, t in zip(shards, locals_):
            width = int(math.prod(t.shape[1:]))
            n = s.chunk * width
            rows = [parts[r][offset : offset + n].view(s.chunk, *t.shape[1:])[: s.span(r)[1] - s.span(r)[0]] for r in range(world)]
            outs.append(torch.cat(rows))
            offset += n
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        shards: list[RowShard] = ctx.shards
        flat = torch.cat([g.contiguous().reshape(-1) for g in grads])
        dist.all_reduce(flat, group=shards[0].group)
        COMM_BYTES["backward"] += flat.numel() * flat.element_size()
        out: list[Any] = [None]
        offset = 0
        for s, g in zip(shards, grads):
            full = flat[offset : offset + g.numel()].view_as(g)
            out.append(full[s.start : s.stop])
            offset += g.numel()
        return tuple(out)


class _AllReduceSum(torch.autograd.Function):
    """Sums over processes (one all_reduce for all the tensors); the gradient is the sum over
    processes of the incoming gradients."""

    @staticmethod
    def forward(ctx: Any, group: Any, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.group = group
        flat = torch.cat([x.contiguous().reshape(-1) for x in xs])
        dist.all_reduce(flat, group=group)
        COMM_BYTES["forward"] += flat.numel() * flat.element_size()
        return tuple(_split_like(flat, xs))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        flat = torch.cat([g.contiguous().reshape(-1) for g in grads])
        dist.all_reduce(flat, group=ctx.group)
        COMM_BYTES["backward"] += flat.numel() * flat.element_size()
        return (None, *_split_like(flat, grads))


def _split_like(flat: torch.Tensor, like: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    out, offset = [], 0
    for x in like:
        out.append(flat[offset : offset + x.numel()].view_as(x))
        offset += x.numel()
    return out


def gather_rows(pairs: list[tuple[torch.Tensor, RowShard]]) -> list[torch.Tensor]:
    """Whole tensors from row shards, differentiable, in one collective each way (`_GatherRows`)."""
    if not pairs:
        return []
    return list(_GatherRows.apply([s for _, s in pairs], *[t for t, _ in pairs]))


def all_reduce_sum(xs: list[torch.Tensor], group: Any) -> list[torch.Tensor]:
    """`sum over processes` of each tensor, differentiable, in one collective each way."""
    if not xs:
        return []
    return list(_AllReduceSum.apply(group, *xs))
