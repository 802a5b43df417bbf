"""Training with memory tables sharded by row owner across processes (`table_sharding.py`): what the data-parallel
wrappers, gradient clipping and checkpoints need to know about them.

- The wrappers keep their hands off the tables: DDP ignores them (`_set_params_and_buffers_to_ignore_for_model`,
  which also skips the start-up broadcast that would overwrite every process's block with the first one's), and
  FSDP2 gets them as ignored modules. Their gradients are already averaged over processes by the reads.
- Gradient clipping counts each table once: the squared norms of the blocks' gradients are summed over the
  processes and added to the norm of the replicated (or FSDP-sharded) gradients, so that every process clips by the
  same factor, the one one process on the whole batch would use.
- A table optimizer's state is per block: each process writes its own (`table-optimizer-<rank>-of-<world>.pt`) into
  a checkpoint, and a run resumes from it on the same number of processes. The tables themselves are written whole
  (`save_pretrained`), so a checkpoint's weights load on any number of processes.
"""

import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.utils import clip_grads_with_norm_, get_total_norm


def sharded_tables(model) -> dict[str, torch.nn.Module]:
    """The memory tables of `model` (a MemoryLlama model or a PEFT model around one) sharded across processes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "memory_tables"):
        return {}
    return {name: module for name, module in base.memory_tables().items() if module.is_sharded}


def table_parameter_names(model, tables) -> list[str]:
    """Every name under which `model` reaches a table's weight (a shared table has several), as DDP names them."""
    weights = {id(module.weight) for module in tables.values()}
    return [name for name, param in model.named_parameters(remove_duplicate=False) if id(param) in weights]


def keep_tables_out_of_ddp(model, tables) -> None:
    """Make DDP, when it wraps `model`, neither all-reduce nor broadcast the sharded tables."""
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, table_parameter_names(model, tables))


def clip_grad_norm_with_shards(parameters, max_norm: float, tables) -> torch.Tensor:
    """The 2-norm of all gradients, each table's counted once over its blocks on all processes, and the gradients
    scaled by max_norm / norm where it exceeds `max_norm` (`inf`: measure only). Collective."""
    table_weights = {id(module.weight) for module in tables.values()}
    params = [p for p in parameters if p.grad is not None]
    blocks = [p for p in params if id(p) in table_weights]
    # The other gradients by device mesh (None: plain tensors): torch takes norms of, and clips, one kind at a time.
    by_mesh = {}
    for p in params:
        if id(p) not in table_weights:
            by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    squares = []
    for group in by_mesh.values():
        norm = get_total_norm([p.grad for p in group])
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float().square())
    sharding = next(iter(tables.values())).row_sharding
    block_square = torch.zeros((), device=sharding.comm_device)
    if blocks:
        block_square = get_total_norm([p.grad for p in blocks]).float().square().to(sharding.comm_device)
    dist.all_reduce(block_square, group=sharding.group)
    device = squares[0].device if squares else block_square.device
    total = torch.stack([*squares, block_square.to(device)]).sum().sqrt()
    if max_norm != float("inf"):
        by_mesh.setdefault(None, []).extend(blocks)  # the blocks are plain tensors
        for group in by_mesh.values():
            clip_grads_with_norm_(group, max_norm, total)
    return total


def state_dict_to_save(model, tables) -> dict:
    """`model`'s state dict for `save_pretrained` with the backbone's FSDP-sharded parameters gathered whole and the
    sharded tables left as they are (`save_pretrained` streams them block by block). Collective."""
    return {
        key: value.full_tensor() if isinstance(value, DTensor) and key not in tables else value
        for key, value in model.state_dict().items()
    }


def optimizer_state_file(sharding) -> str:
    return f"table-optimizer-{sharding.rank}-of-{sharding.world_size}.pt"


def _state_of(optimizer, param) -> dict:
    """The state dict of the optimizer that updates `param`, inside accelerate's wrapper and a `CombinedOptimizer`."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    for inner in getattr(optimizer, "optimizers", [optimizer]):
        if any(p is param for group in inner.param_groups for p in group["params"]):
            return inner.state
    return None  # a frozen table


def save_table_optimizer_state(optimizer, tables, folder: str) -> None:
    """Write this process's optimizer state of its table blocks into `folder` (every process calls it)."""
    state = {}
    for name, module in tables.items():
        param_state = (_state_of(optimizer, module.weight) or {}).get(module.weight)
        if param_state:
            state[name] = {key: value.cpu() if torch.is_tensor(value) else value for key, value in param_state.items()}
    sharding = next(iter(tables.values())).row_sharding
    torch.save(state, os.path.join(folder, optimizer_state_file(sharding)))


def check_table_optimizer_state(folder: str, world_size: int) -> None:
    """Refuse, before any work, to resume from checkpoint `folder` with a number of processes its table optimizer
    state was not written for (`world_size`: the processes this run shards its tables over; 1 for whole tables)."""
    written = sorted(name for name in os.listdir(folder) if name.startswith("table-optimizer-"))
    written_for = int(written[0].split("-of-")[1].removesuffix(".pt")) if written else 1
    if written_for == world_size:
        return
    if written:
        raise ValueError(
            f"{folder} was written by a run of {written_for} processes; this run has {world_size}. The table "
            "optimizer's state is kept per process: resume on the same number of processes, or start a new run from "
            "the checkpoint's weights (they load on any number)."
        )
    raise ValueError(
        f"{folder} has no per-process table optimizer state: it was written by a run whose tables were whole (one "
        f"process), and this run shards them over {world_size}. Resume in one process, or start a new run from the "
        "checkpoint's weights."
    )


def load_table_optimizer_state(optimizer, tables, folder: str) -> None:
    """Put this process's table-block optimizer state from `folder` into `optimizer` (in place of whatever the
    shared optimizer checkpoint, written by the first process, gave its tables)."""
    sharding = next(iter(tables.values())).row_sharding
    saved = torch.load(os.path.join(folder, optimizer_state_file(sharding)), weights_only=True)
    for name, module in tables.items():
        weight = module.weight
        state = _state_of(optimizer, weight)
        if state is None:
            continue
        state.pop(weight, None)
        if name in saved:
            state[weight] = {
                key: value.to(weight.device) if torch.is_tensor(value) and value.dim() > 0 else value
                for key, value in saved[name].items()
            }


__all__ = [
    "check_table_optimizer_state",
    "clip_grad_norm_with_shards",
    "keep_tables_out_of_ddp",
    "load_table_optimizer_state",
    "save_table_optimizer_state",
    "sharded_tables",
    "state_dict_to_save",
]
