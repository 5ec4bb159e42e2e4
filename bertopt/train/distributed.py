"""Process-group setup for multi-process training, and the few collectives the loop needs.

``torchrun --nproc_per_node=N -m bertopt pretrain ...`` sets RANK / WORLD_SIZE / LOCAL_RANK;
:func:`init_distributed` reads them, picks NCCL when CUDA is available and gloo otherwise, and
returns a :class:`DistContext`. Without those variables everything runs in one process and the
collectives below are no-ops, so training code is written once.

:func:`wrap_model` puts the model under DDP or, with ``fsdp=True``, FSDP2
(``torch.distributed.fsdp.fully_shard``: each block listed by ``shard_modules`` becomes its own
unit, then the root).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    # --- collectives (no-ops in a single process) ---

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum ``values`` (a float64 tensor) over all ranks; returns a CPU tensor."""
        if not self.enabled:
            return values
        buf = values.to(self.device)
        torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
        return buf.cpu()

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group that torchrun describes in the environment, if any.

    ``device``: "auto" (CUDA if available, else CPU), "cpu" or "cuda".
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be one of auto, cpu, cuda; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch sees no CUDA device; use --device cpu")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} / WORLD_SIZE={world_size} from the environment are inconsistent")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size == 1:
        return DistContext(device=dev)
    import torch.distributed as dist

    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend=backend, **kwargs)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend)


def choose_threads(requested: int = 0, *, world_size: int = 1) -> int:
    """Intra-op threads for this process: ``requested`` if > 0, else the cores this process may use
    (split among local processes) minus the load already on the machine, at least 1.

    Small models on a busy CPU run several times faster on one thread than on threads that spin
    while waiting for cores other jobs hold, so "auto" backs off when the machine is loaded.
    """
    if requested < 0:
        raise ValueError(f"--threads must be >= 0 (0: automatic); got {requested}")
    if requested:
        return requested
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    share = max(1, cores // max(1, world_size))
    try:
        free = cores - os.getloadavg()[0]
    except OSError:
        free = cores
    return max(1, min(share, int(free + 0.5)))


def teardown_distributed(ctx: DistContext) -> None:
    if ctx.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def wrap_model(
    module: torch.nn.Module,
    ctx: DistContext,
    *,
    fsdp: bool = False,
    shard_modules: Iterable[torch.nn.Module] = (),
) -> torch.nn.Module:
    """Return ``module`` ready for training in ``ctx``: as is (one process), under DDP, or sharded
    with FSDP2 (``fsdp=True``; each of ``shard_modules`` is sharded separately, then the root).

    With FSDP2 the module is sharded in place and returned; its parameters become DTensors, so
    create the optimizer after calling this.
    """
    module = module.to(ctx.device)
    if fsdp:
        if not ctx.enabled:
            # one process: fully_shard over a 1-rank mesh is legal but gains nothing; keep it simple
            return module
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        for block in shard_modules:
            fully_shard(block, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module
    if not ctx.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def gradient_sync(model: torch.nn.Module, enabled: bool):
    """A context in whose backward passes gradients are (``enabled``) or are not all-reduced across
    processes: DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync``; nothing in one process.
    Gradient accumulation syncs on the last micro-batch only."""
    import contextlib

    if enabled:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        @contextlib.contextmanager
        def fsdp_no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return fsdp_no_sync()
    return contextlib.nullcontext()
