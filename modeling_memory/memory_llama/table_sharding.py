"""Memory tables sharded by row owner across the processes of a `torch.distributed` run.

Each of W processes owns one contiguous block of every table's rows (rank r: rows [r * c, (r + 1) * c) with
c = ceil(rows / W), the layout of a `DTensor` placed `Shard(0)`), kept in any placement of `table_placement.py`.
A read sends the distinct rows it needs to their owners with `all_to_all`, and the owners send the rows back;
in backward the rows' gradients go back to their owners the same way, where they become a sparse row gradient
of the owner's block, averaged over the processes as DDP averages gradients. The table optimizers then update the
owner's rows in place. No process ever holds a whole table, a dense gradient of one, or a copy of another's rows
beyond the ones it reads.

The tables' collectives run on a process group of their own (the same processes as the default group), so they
never interleave with the collectives of DDP or FSDP, which keep their hands off the tables (the trainer lists
them as ignored). Every read is collective: all processes run the same forwards and backwards, as data-parallel
training and evaluation do.

In a state dict a sharded table is a `DTensor` (`Shard(0)` over all processes) whose `to_local()` is the
process's block, so that torch.distributed.checkpoint and the tools built on it save and reshard it; loading
takes such a DTensor or a whole table (of which each process keeps its rows).

Shapes: U distinct rows a process reads, R rows other processes ask of its block, D row width.
"""

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .ops_table_rows import sparse_row_gradient
from .table_placement import _gather, safetensors_header, table_bytes, write_rows


@dataclass(frozen=True)
class RowSharding:
    """Which rows of a table this process owns, and the process group its reads exchange rows over."""

    group: "dist.ProcessGroup"
    rank: int
    world_size: int
    num_rows: int
    rows_per_rank: int
    comm_device: torch.device  # where the exchanged tensors live: the CPU for gloo, the GPU for NCCL

    @property
    def start(self) -> int:
        return min(self.rank * self.rows_per_rank, self.num_rows)

    @property
    def stop(self) -> int:
        return min(self.start + self.rows_per_rank, self.num_rows)

    def global_shape(self, local: torch.Tensor) -> tuple[int, ...]:
        return (self.num_rows, *local.shape[1:])


_NO_PROCESS_GROUP = (
    "Sharding memory tables by row owner needs torch.distributed: launch with `torchrun` or `accelerate launch` (and "
    "create the Trainer, or call `torch.distributed.init_process_group`, first)."
)


def require_process_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(_NO_PROCESS_GROUP)


def launched_world_size() -> int:
    """The number of processes of this run: the process group's, or before it exists (`from_pretrained` with
    `tp_plan` creates it while loading) the launcher's WORLD_SIZE. Refuses a process that no launcher started."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if "WORLD_SIZE" not in os.environ:
        raise RuntimeError(_NO_PROCESS_GROUP)
    return int(os.environ["WORLD_SIZE"])


@functools.cache
def _tables_group(backend: str, ranks: tuple[int, ...]) -> "dist.ProcessGroup":
    # Created once, by every process in the same order (new_group is collective).
    return dist.new_group(ranks=list(ranks), backend=backend)


def rows_per_process(num_rows: int, world_size: int, name: str) -> int:
    """The rows of each process's block (the last may hold fewer): ceil(num_rows / world_size), as `Shard(0)` splits."""
    rows_per_rank = -(-num_rows // world_size)
    if rows_per_rank * (world_size - 1) >= num_rows:
        raise ValueError(
            f"Table {name} has {num_rows} rows, too few to give each of {world_size} processes some: run on fewer "
            "processes, or make the table larger."
        )
    return rows_per_rank


def row_sharding_for(num_rows: int, name: str) -> RowSharding:
    """The row block of a `num_rows` table this process owns under the default process group."""
    require_process_group()
    world_size, rank = dist.get_world_size(), dist.get_rank()
    rows_per_rank = rows_per_process(num_rows, world_size, name)
    backend = str(dist.get_backend())
    comm_device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
    group = _tables_group(backend, tuple(range(world_size)))
    return RowSharding(group, rank, world_size, num_rows, rows_per_rank, comm_device)


def meta_blocks(tables: dict, world_size: int) -> dict:
    """Stand-ins, on the `meta` device, of the largest block of each table a process of a `world_size` run holds:
    what placement checks count before anything loads."""
    blocks = {}
    for name, module in tables.items():
        weight = module.weight
        block = torch.nn.Module()
        block.weight = torch.nn.Parameter(
            torch.empty((rows_per_process(weight.shape[0], world_size, name), *weight.shape[1:]), dtype=weight.dtype, device="meta"),
            requires_grad=False,
        )
        block.working_copy = None
        blocks[name] = block
    return blocks


def _all_to_all(tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int], sharding: RowSharding):
    out = tensor.new_empty((sum(recv_counts), *tensor.shape[1:]))
    dist.all_to_all_single(out, tensor.contiguous(), recv_counts, send_counts, group=sharding.group)
    return out


class ShardedRowFetch:
    """The distinct rows of a sharded table one read needs, exchanged with their owners (read as a `RowFetch` is:
    `inverse`, `result()`).

    inverse: positions of the rows asked for among the U distinct rows (ascending global ids), on the compute
    device, shaped as they were asked for."""

    def __init__(self, module, row_ids: torch.Tensor):
        sharding: RowSharding = module.row_sharding
        self.sharding = sharding
        self.device = row_ids.device
        unique_rows, self.inverse = torch.unique(row_ids, sorted=True, return_inverse=True)
        comm = sharding.comm_device
        wanted = unique_rows.to(comm)
        owners = torch.div(wanted, sharding.rows_per_rank, rounding_mode="floor")
        counts = torch.bincount(owners, minlength=sharding.world_size)
        asked_counts = torch.empty_like(counts)
        dist.all_to_all_single(asked_counts, counts, group=sharding.group)
        # Ascending ids are grouped by owner already: the send order is the order of `unique_rows`.
        self.send_counts, self.recv_counts = counts.tolist(), asked_counts.tolist()
        asked = _all_to_all(wanted, self.send_counts, self.recv_counts, sharding) - sharding.start
        weight = module.weight.detach()
        self.asked = asked.to(weight.device)  # rows of this process's block others read, kept for backward
        if module.is_offloaded:
            local = torch.empty((asked.numel(), *weight.shape[1:]), dtype=weight.dtype)
            _gather(weight, asked.to("cpu"), local)
        else:
            local = weight.index_select(0, self.asked)
        self._rows = _all_to_all(local.to(comm), self.recv_counts, self.send_counts, sharding).to(self.device)

    def result(self) -> torch.Tensor:
        """(U, D) the rows, on the compute device."""
        return self._rows


class _ShardedRows(torch.autograd.Function):
    """The rows of a `ShardedRowFetch` as a function of this process's block, so that every process's gradient of
    them reaches the rows' owner: a sparse row gradient of the block (dense when the table asks for dense
    gradients), the mean over the processes as DDP's all-reduce gives."""

    @staticmethod
    def forward(ctx, weight, fetch, sparse_grad):
        ctx.fetch, ctx.sparse_grad = fetch, sparse_grad
        ctx.local_shape, ctx.table_dtype, ctx.table_device = weight.shape, weight.dtype, weight.device
        return fetch.result().clone()

    @staticmethod
    def backward(ctx, grad):
        fetch = ctx.fetch
        if grad.is_sparse:
            grad = grad.to_dense()
        received = _all_to_all(grad.to(fetch.sharding.comm_device), fetch.send_counts, fetch.recv_counts, fetch.sharding)
        received = (received.float() / fetch.sharding.world_size).to(ctx.table_device)
        table_grad = sparse_row_gradient(received, fetch.asked, ctx.local_shape, ctx.table_dtype)
        ctx.fetch = None
        return (table_grad if ctx.sparse_grad else table_grad.to_dense()), None, None


def sharded_rows(module, fetch: ShardedRowFetch) -> torch.Tensor:
    """(U, D) the rows of `fetch`; differentiable with respect to the module's block while training."""
    weight = module.weight
    if weight.requires_grad and torch.is_grad_enabled():
        return _ShardedRows.apply(weight, fetch, module.sparse)
    return fetch.result()


def shard_rows(module, name: str) -> RowSharding:
    """Keep only this process's block of the table's rows (the Parameter object stays, so optimizers built later
    see the block). A table on the `meta` device (built without storage) keeps a `meta` block of its rows' shape."""
    weight = module.weight
    sharding = row_sharding_for(weight.shape[0], name)
    block = weight.data[sharding.start : sharding.stop]
    with torch.no_grad():
        weight.data = block if block.is_meta else block.clone()
    module.row_sharding = sharding
    return sharding


def as_dtensor(module, tensor: torch.Tensor):
    """The table as a `DTensor` placed `Shard(0)` over all processes, whose `to_local()` is `tensor` (the block)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    sharding: RowSharding = module.row_sharding
    mesh = DeviceMesh.from_group(sharding.group, tensor.device.type)
    shape = sharding.global_shape(tensor)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(tensor, mesh, (Shard(0),), run_check=False, shape=shape, stride=stride)


def local_block_of(module, value: torch.Tensor, key: str) -> torch.Tensor:
    """This process's block of a table in a state dict being loaded: the local part of a `DTensor` sharded as this
    table is, or the owned rows of a whole table. Anything else is refused with the layouts named."""
    from torch.distributed.tensor import DTensor, Shard

    sharding: RowSharding = module.row_sharding
    expected = sharding.global_shape(module.weight)
    if isinstance(value, DTensor):
        if tuple(value.shape) != expected or tuple(value.placements) != (Shard(0),) or value.device_mesh.size() != sharding.world_size:
            raise ValueError(
                f"{key}: a DTensor of shape {tuple(value.shape)} placed {value.placements} over "
                f"{value.device_mesh.size()} processes cannot load into this table, sharded Shard(0) over "
                f"{sharding.world_size} processes at shape {expected}. Load a whole checkpoint (save_pretrained's), or "
                "reshard with torch.distributed.checkpoint."
            )
        return value.to_local()
    if tuple(value.shape) != expected:
        raise ValueError(
            f"{key}: the checkpoint holds a table of shape {tuple(value.shape)}, but this model's table is "
            f"{expected} (sharded over {sharding.world_size} processes). A checkpoint's tables are whole: was it "
            "saved from a model with another configuration?"
        )
    return value[sharding.start : sharding.stop]


def write_sharded_table(path: str, key: str, module, metadata: dict[str, str] | None = None) -> None:
    """Write a sharded table into one safetensors file at `path`, each process streaming its own block into its
    rows' byte range (collective: every process calls it; the folder must be one all processes see). The file
    appears under `path` only once every block is written and synced."""
    sharding: RowSharding = module.row_sharding
    block = module.weight.detach()
    whole = torch.empty(sharding.global_shape(block), dtype=block.dtype, device="meta")
    header = safetensors_header({key: whole}, metadata)
    partial = f"{path}.partial"
    if sharding.rank == 0:
        with open(partial, "wb") as file:
            file.write(header)
            file.truncate(len(header) + table_bytes(whole))
    dist.barrier(group=sharding.group)
    row_bytes = table_bytes(block[:1]) if block.shape[0] else 0
    with open(partial, "r+b") as file:
        file.seek(len(header) + sharding.start * row_bytes)
        write_rows(file, block)
        file.flush()
        os.fsync(file.fileno())
    dist.barrier(group=sharding.group)
    if sharding.rank == 0:
        os.replace(partial, path)
    dist.barrier(group=sharding.group)


__all__ = [
    "RowSharding",
    "ShardedRowFetch",
    "as_dtensor",
    "launched_world_size",
    "local_block_of",
    "meta_blocks",
    "require_process_group",
    "rows_per_process",
    "shard_rows",
    "sharded_rows",
    "write_sharded_table",
]
