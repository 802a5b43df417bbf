"""Where a memory table lives, chosen at run time and never written into `config.json`.

- `device`: beside the rest of the model (the default).
- `host`: in the machine's RAM while the model runs on an accelerator; on a CUDA machine the rows are pinned
  in place at their exact size (`cudaHostRegister`: `Tensor.pin_memory()` would round the allocation up to a
  power of two).
- `disk`: a working copy of the table, a one-tensor safetensors file in an offload folder, mapped shared
  (`MAP_SHARED`) so that the table optimizers' row writes reach the file. The page cache is the cache: the
  table may be larger than the machine's RAM. The working copy is never a checkpoint: `save_pretrained`
  streams the table into one, and the copy is recreated from its source at each placement.

A table off the device is read a step's rows at a time: the distinct rows read are gathered on the host
(`fetch_rows`, on a background thread when the addresses are known early, as Engram's are) and moved to the
compute device, and their gradient goes back as a sparse row gradient of the table, which the table
optimizers apply in place. Moving the model (`.to()`, `.cuda()`, `.half()`) leaves such a table where it is.

Shapes: U distinct rows read, D row width.
"""

import concurrent.futures
import contextlib
import contextvars
import functools
import json
import mmap
import os
import pathlib
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch


MEMORY_PLACEMENTS = ("device", "host", "disk")

# Rows are copied into and out of working copies this many bytes at a time (bounds the RAM a copy needs).
COPY_CHUNK_BYTES = 64 << 20
# Reads of rows from a table on disk in flight at once: a cold read waits on the disk, and many outstanding
# requests hide that wait (a 2 GiB table, 32,768 random rows: ~2 s on one thread, ~0.6 s on 32).
FETCH_THREADS = 16
# Fewer rows than this are fetched on one thread.
ROWS_PER_FETCH_THREAD = 2048

_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
}
_TORCH_DTYPES = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}


_DEFERRED_TABLES = contextvars.ContextVar("deferred_memory_tables", default=False)


@contextlib.contextmanager
def deferred_memory_tables():
    """Build models whose memory tables have no storage yet (they sit on the `meta` device), so that
    `set_memory_placement` then creates each table straight in its placement, filled as `_init_weights` fills it:
    a table larger than the machine's RAM never passes through RAM. Everything else is built as usual.

        with deferred_memory_tables():
            model = MemoryLlamaForCausalLM(config)
        model.set_memory_placement("disk", "offload")
    """
    token = _DEFERRED_TABLES.set(True)
    try:
        yield
    finally:
        _DEFERRED_TABLES.reset(token)


def new_table_device() -> str | None:
    """The device a table module allocates its weight on when built: `meta` inside `deferred_memory_tables`."""
    return "meta" if _DEFERRED_TABLES.get() else None


class MemoryTable:
    """Mixin of the memory table modules (an Engram table, a chapter bank, a product-key values table): a module
    whose `weight` is the table. `memory_placement` says where the weight lives; off the device, moving the model
    (`Module._apply`, under `.to()`, `.cuda()`, `.half()`, `.float()`) leaves the weight where it is."""

    memory_placement = "device"
    working_copy = None  # the `WorkingCopy` of a table on disk
    row_sharding = None  # the `RowSharding` of a table sharded by row owner across processes (table_sharding.py)

    @property
    def is_offloaded(self) -> bool:
        return self.memory_placement != "device"

    @property
    def is_sharded(self) -> bool:
        return self.row_sharding is not None

    @property
    def reads_by_fetch(self) -> bool:
        """Whether a read gathers its distinct rows first (`fetch_rows`, `read_fetched`) instead of indexing the
        weight: a table off the device, or one whose rows are spread over processes."""
        return self.is_offloaded or self.is_sharded

    def fetch_rows(self, row_ids: torch.Tensor, background: bool = False):
        """Start bringing the distinct rows of `row_ids` to the compute device: a `RowFetch` (on a background thread
        with `background`), or for a sharded table a `ShardedRowFetch` (from their owners, now)."""
        if self.is_sharded:
            from .table_sharding import ShardedRowFetch

            return ShardedRowFetch(self, row_ids)
        return RowFetch(self.weight, row_ids, background)

    def read_fetched(self, fetch) -> torch.Tensor:
        """(U, D) the rows of `fetch`, differentiable with respect to the table (sparse row gradients unless the
        table asks for dense ones)."""
        if self.is_sharded:
            from .table_sharding import sharded_rows

            return sharded_rows(self, fetch)
        return fetched_rows(self.weight, fetch, self.sparse)

    # A sharded table appears in state dicts as a DTensor of the whole table (table_sharding.py).
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.is_sharded:
            from .table_sharding import as_dtensor

            destination[prefix + "weight"] = as_dtensor(self, destination[prefix + "weight"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "weight"
        if self.is_sharded and key in state_dict:
            from .table_sharding import local_block_of

            state_dict[key] = local_block_of(self, state_dict[key], key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        if not self.is_offloaded:
            return super()._apply(fn, recurse)
        weight = self._parameters.pop("weight")
        try:
            return super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = weight


def _check_dtype(tensor: torch.Tensor, name: str) -> str:
    if tensor.dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"Table {name} has dtype {tensor.dtype}; tables off the device must be floating point.")
    return _SAFETENSORS_DTYPES[tensor.dtype]


def safetensors_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The header of a safetensors file holding `tensors` in this order (the length prefix included), padded to
    8 bytes as the format requires."""
    header, start = {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        dtype = _check_dtype(tensor, name)
        header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [start, start + nbytes]}
        start += nbytes
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded


def _row_chunks(tensor: torch.Tensor):
    rows_per_chunk = max(1, COPY_CHUNK_BYTES // max(1, tensor[0].numel() * tensor.element_size()))
    for start in range(0, tensor.shape[0], rows_per_chunk):
        yield slice(start, min(start + rows_per_chunk, tensor.shape[0]))


def write_rows(file, tensor: torch.Tensor) -> None:
    """Write `tensor`'s bytes at `file`'s position a block of rows at a time (never a second full copy in RAM)."""
    for rows in _row_chunks(tensor):
        file.write(memoryview(tensor[rows].detach().to("cpu").contiguous().view(torch.uint8).numpy()))


def write_safetensors_streaming(path: str, tensors: dict[str, torch.Tensor], metadata=None) -> None:
    """Write `tensors` as a safetensors file, a block of rows at a time (never a second full copy in RAM: a table
    on disk or larger than RAM is read through the page cache). Written under a temporary name and renamed, so
    that an interrupted write leaves nothing under `path`."""
    partial = f"{path}.partial"
    try:
        with open(partial, "wb") as file:
            file.write(safetensors_header(tensors, metadata))
            for tensor in tensors.values():
                write_rows(file, tensor)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


@dataclass
class WorkingCopy:
    """A table's working copy on disk: the file, its shared mapping, and the tensor viewing the table's bytes."""

    path: str
    mapping: mmap.mmap
    tensor: torch.Tensor

    def flush(self) -> None:
        self.mapping.flush()

    def close(self, remove: bool = True) -> None:
        self.tensor = None
        try:
            self.mapping.close()
        except BufferError:  # a tensor still views the mapping: the OS unmaps it when that tensor is freed
            pass
        if remove and os.path.exists(self.path):
            os.remove(self.path)


def map_safetensors_shared(path: str, name: str, shape: tuple, dtype: torch.dtype) -> WorkingCopy:
    """Map tensor `name` of the safetensors file at `path` shared and writable, after checking that the file holds
    it at the expected shape and dtype and is as long as its header says."""
    with open(path, "rb") as file:
        header_len = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_len))
    entry = header.get(name)
    expected = {"dtype": _SAFETENSORS_DTYPES.get(dtype), "shape": list(shape)}
    if entry is None or {"dtype": entry["dtype"], "shape": entry["shape"]} != expected:
        found = None if entry is None else {"dtype": entry["dtype"], "shape": entry["shape"]}
        raise ValueError(f"{path} holds {name} as {found}, not {expected}: the file is not this table's.")
    start, end = entry["data_offsets"]
    data_start = 8 + header_len
    if os.path.getsize(path) < data_start + end:
        raise ValueError(
            f"{path} is {os.path.getsize(path)} bytes but its header needs {data_start + end}: the file is truncated."
        )
    with open(path, "r+b") as file:
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_WRITE)
    # A step reads scattered rows: without this, each page fault also reads the pages around it (read-around,
    # 32 pages), so a row of a few hundred bytes costs 128 KiB of disk reads and of page cache.
    mapping.madvise(mmap.MADV_RANDOM)
    numel = (end - start) // torch.empty((), dtype=dtype).element_size()
    tensor = torch.frombuffer(mapping, dtype=dtype, count=numel, offset=data_start + start).view(shape)
    return WorkingCopy(path, mapping, tensor)


def _file_name(table_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", table_name) + ".safetensors"


def working_copy_path(offload_dir: str, table_name: str) -> str:
    return os.path.join(offload_dir, _file_name(table_name))


def table_bytes(weight: torch.Tensor) -> int:
    return weight.numel() * weight.element_size()


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def available_ram_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _in_ram(module: MemoryTable) -> bool:
    weight = module.weight
    return weight.device.type == "cpu" and not weight.is_meta and module.working_copy is None


def check_placement(placement: str, offload_dir: str | None, tables: dict[str, MemoryTable]) -> None:
    """Refuse, before any work, a placement the machine cannot serve: an unknown name, `disk` without a writable
    offload folder with room for every table, `host` for tables larger than the RAM available."""
    if placement not in MEMORY_PLACEMENTS:
        raise ValueError(f"memory_placement={placement!r}: choose one of {', '.join(MEMORY_PLACEMENTS)}.")
    if offload_dir is not None and placement != "disk":
        raise ValueError(f"memory_offload_dir is used only with memory_placement='disk', not {placement!r}.")
    needed = sum(table_bytes(module.weight) for module in tables.values())
    if placement == "disk":
        if offload_dir is None:
            raise ValueError(
                "memory_placement='disk' needs memory_offload_dir: a folder on a local disk with room for the tables' "
                f"working copies ({_size(needed)})."
            )
        folder = pathlib.Path(os.path.abspath(offload_dir))
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"memory_offload_dir {offload_dir!r} is a file; pass a folder.")
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"memory_offload_dir {offload_dir!r} cannot be written ({existing} is not writable).")
        # Working copies already in the folder are replaced, so their room counts as free.
        reusable = sum(
            os.path.getsize(working_copy_path(offload_dir, name))
            for name in tables
            if os.path.exists(working_copy_path(offload_dir, name))
        )
        free = shutil.disk_usage(existing).free + reusable
        if needed > free:
            raise ValueError(
                f"The tables need {_size(needed)} in memory_offload_dir {offload_dir!r} but its disk has "
                f"{_size(free)} free: free space or choose a folder on a larger disk."
            )
    if placement == "host":
        to_load = sum(table_bytes(module.weight) for module in tables.values() if not _in_ram(module))
        available = available_ram_bytes()
        if available is not None and to_load > available:
            raise ValueError(
                f"The tables need {_size(to_load)} more RAM but {_size(available)} is available: "
                "use memory_placement='disk' with a memory_offload_dir."
            )


def _pin_in_place(tensor: torch.Tensor) -> None:
    """Page-lock a host tensor at its exact size, so that copies to the GPU can run asynchronously."""
    result = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), table_bytes(tensor), 0)
    if int(result) != 0:
        raise RuntimeError(f"cudaHostRegister failed ({result}) for a {_size(table_bytes(tensor))} table.")


def _unpin(tensor: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())


def place_table(
    module: MemoryTable,
    name: str,
    placement: str,
    compute_device: torch.device,
    offload_dir: str | None = None,
    initialise: Callable[[torch.Tensor], None] | None = None,
) -> None:
    """Move one table to `placement` (checked beforehand by `check_placement`), keeping its Parameter object (so an
    optimizer holding it keeps working). A table still on the `meta` device (a model built without weights) is
    created there and filled by `initialise(rows)` a block of rows at a time."""
    weight = module.weight
    source = weight.data
    if placement == module.memory_placement == "device" and source.device == compute_device:
        return
    old_copy, was_pinned = module.working_copy, getattr(module, "_pinned", False)
    if placement == "device":
        new = torch.empty(source.shape, dtype=source.dtype, device=compute_device)
    elif placement == "host":
        new = torch.empty(source.shape, dtype=source.dtype, device="cpu")
    else:
        os.makedirs(offload_dir, exist_ok=True)
        path = working_copy_path(offload_dir, name)
        if old_copy is not None and os.path.abspath(old_copy.path) == os.path.abspath(path):
            # Already this file: nothing to copy.
            module.memory_placement = placement
            return
        _write_working_copy(path, name, source, initialise)
        new_copy = map_safetensors_shared(path, name, tuple(source.shape), source.dtype)
        new = new_copy.tensor
    if placement != "disk":
        if source.is_meta:
            for rows in _row_chunks(new):
                initialise(new[rows])
        else:
            for rows in _row_chunks(source):
                new[rows].copy_(source[rows])
        if placement == "host" and compute_device.type == "cuda":
            _pin_in_place(new)
    if source.is_meta:  # a meta tensor cannot take data: the table gets its first Parameter
        module.weight = torch.nn.Parameter(new, requires_grad=weight.requires_grad)
    else:
        with torch.no_grad():
            weight.data = new
    if was_pinned:
        _unpin(source)
    module._pinned = placement == "host" and compute_device.type == "cuda"
    module.working_copy = new_copy if placement == "disk" else None
    module.memory_placement = placement
    if old_copy is not None:
        old_copy.close(remove=True)


def _write_working_copy(path: str, name: str, source: torch.Tensor, initialise) -> None:
    if not source.is_meta:
        write_safetensors_streaming(path, {name: source})
        return
    # A table with no values yet: the file at full size, its rows filled by `initialise` through the mapping.
    header = safetensors_header({name: source})
    partial = f"{path}.partial"
    try:
        with open(partial, "wb") as file:
            file.write(header)
            file.truncate(len(header) + table_bytes(source))
        staged = map_safetensors_shared(partial, name, tuple(source.shape), source.dtype)
        for rows in _row_chunks(staged.tensor):
            initialise(staged.tensor[rows])
        staged.flush()
        staged.close(remove=False)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


@functools.cache
def _fetch_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Runs whole fetches in the background (one per Engram layer and forward)."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="memory-fetch")


@functools.cache
def _gather_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Runs the parts of one fetch; a pool of its own, so that a fetch waiting on its parts never holds the workers
    those parts need."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=FETCH_THREADS, thread_name_prefix="memory-rows")


def _gather(table: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = table[rows], split over the fetch threads when there are many rows (a cold read waits on the disk)."""
    count = rows.numel()
    parts = min(FETCH_THREADS, max(1, count // ROWS_PER_FETCH_THREAD))
    if parts == 1:
        return torch.index_select(table, 0, rows, out=out)
    bounds = [count * i // parts for i in range(parts + 1)]
    jobs = [
        _gather_pool().submit(torch.index_select, table, 0, rows[lo:hi], out=out[lo:hi])
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]
    for job in jobs:
        job.result()
    return out


class RowFetch:
    """The distinct rows of an off-device table that one read needs, being fetched to the compute device.

    unique_rows: (U,) int64 on the host, ascending; inverse: positions into them of the rows asked for, on the
    compute device, shaped as they were asked for."""

    def __init__(self, table: torch.Tensor, row_ids: torch.Tensor, background: bool):
        self.table = table
        self.device = row_ids.device
        unique_rows, inverse = torch.unique(row_ids, sorted=True, return_inverse=True)
        self.inverse = inverse
        self.unique_rows = unique_rows.to("cpu")
        self._event = None
        if background:
            self._result = None
            self._job = _fetch_pool().submit(self._fetch)
        else:
            self._job = None
            self._result = self._fetch()

    def _fetch(self) -> torch.Tensor:
        table, rows = self.table, self.unique_rows
        to_gpu = self.device.type == "cuda"
        staging = torch.empty((rows.numel(), table.shape[1]), dtype=table.dtype, pin_memory=to_gpu)
        _gather(table.detach(), rows, staging)
        if not to_gpu:
            return staging.to(self.device)
        # A side stream, so that the copy runs beside the layers before the one that reads it.
        stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            fetched = staging.to(self.device, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(stream)
        return fetched

    def result(self) -> torch.Tensor:
        """(U, D) the rows, on the compute device (waits for the fetch)."""
        if self._job is not None:
            self._result, self._job = self._job.result(), None
        if self._event is not None:
            torch.cuda.current_stream(self.device).wait_event(self._event)
            self._result.record_stream(torch.cuda.current_stream(self.device))
            self._event = None
        return self._result


class _OffloadedRows(torch.autograd.Function):
    """The rows of a `RowFetch` as a function of the table, so that their gradient reaches it: a sparse row gradient
    of the table, on the table's device (dense when the table's module asks for dense gradients)."""

    @staticmethod
    def forward(ctx, table, unique_rows, fetched, sparse_grad):
        ctx.save_for_backward(unique_rows)
        ctx.table_shape, ctx.table_dtype, ctx.table_device = table.shape, table.dtype, table.device
        ctx.sparse_grad = sparse_grad
        return fetched.clone()

    @staticmethod
    def backward(ctx, grad):
        (unique_rows,) = ctx.saved_tensors
        if grad.is_sparse:
            grad = grad.coalesce()
            local, values = grad.indices()[0].to("cpu"), grad.values()
            rows = unique_rows.index_select(0, local)
        else:
            rows, values = unique_rows, grad
        values = values.to(ctx.table_device, ctx.table_dtype)
        table_grad = torch.sparse_coo_tensor(
            rows.to(ctx.table_device)[None], values, tuple(ctx.table_shape), is_coalesced=True, check_invariants=False
        )
        return (table_grad if ctx.sparse_grad else table_grad.to_dense()), None, None, None


def fetched_rows(table: torch.Tensor, fetch: RowFetch, sparse_grad: bool = True) -> torch.Tensor:
    """(U, D) the rows of `fetch` on the compute device; differentiable with respect to `table` while training."""
    rows = fetch.result()
    if table.requires_grad and torch.is_grad_enabled():
        return _OffloadedRows.apply(table, fetch.unique_rows, rows, sparse_grad)
    return rows


__all__ = [
    "MEMORY_PLACEMENTS",
    "deferred_memory_tables",
    "MemoryTable",
    "RowFetch",
    "check_placement",
    "fetched_rows",
    "map_safetensors_shared",
    "place_table",
    "write_safetensors_streaming",
]
