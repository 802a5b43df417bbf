"""Optimizers for memory tables (Engram tables, chapter banks, any memory value table) that read and write
only the rows a step touched, and the pieces that let them sit beside a dense optimizer.

Tables train with sparse row gradients (a coalesced `torch.sparse_coo_tensor` of the rows read, see
`ops_table_rows.py`), so a step's cost must not depend on the table's size: each optimizer here updates
the touched rows and their state only. Rows a step did not read, and their state, stay bit-identical.

- `LazyAdam`: Adam whose moments are updated for the touched rows only (the Engram paper's recipe for its
  tables: Adam at lr x 5, no weight decay). State: two floats per table weight.
- `RowWiseAdagrad`: FBGEMM's EXACT_ROWWISE_ADAGRAD. One fp32 scalar per row, the running sum of the row's
  mean squared gradient, so the state is a fraction 1/D of the table:

      G_r += mean_j(g_rj^2)                       (only rows that received a gradient)
      w_r -= lr * g_r / (sqrt(G_r) + eps)         (after decoupled weight decay w_r *= 1 - lr*wd)

- `CombinedOptimizer` puts several optimizers over disjoint parameters behind one `Optimizer`, so that the
  tables train with one of the above and everything else with AdamW while the learning-rate scheduler,
  accelerate and Trainer checkpoints see a single optimizer.
- Importing this module gives torch's `linalg.vector_norm` the sparse COO layout (the norm of the coalesced
  values), the one op torch's `clip_grad_norm_` lacks for sparse gradients (torch 2.13 and 2.14 raise
  NotImplementedError). Gradient clipping and the `grad_norm` that Trainer logs (through accelerate, which
  calls torch's `clip_grad_norm_`) then count the tables' sparse gradients as they are, with no densifying copy.

Both table optimizers take dense gradients too (rows whose gradient is all zero count as untouched).
Needs torch only.
"""

import math

import torch
from torch.optim import Optimizer


def _sparse_vector_norm(tensor: torch.Tensor, ord=2, dim=None, keepdim=False, *, dtype=None) -> torch.Tensor:
    """`linalg.vector_norm` of a sparse COO tensor over all its elements: the norm of its coalesced values (the
    zeros it leaves out add nothing to a norm of order >= 0)."""
    if dim is not None or keepdim or ord < 0:
        raise NotImplementedError("linalg.vector_norm of a sparse tensor: over all its elements, of order >= 0 only.")
    values = tensor.coalesce().values()
    if values.numel() == 0:  # no row touched
        return torch.zeros((), dtype=dtype or values.dtype, device=values.device)
    return torch.linalg.vector_norm(values, ord, dtype=dtype)


def _torch_has_sparse_vector_norm() -> bool:
    try:
        torch.linalg.vector_norm(torch.sparse_coo_tensor(torch.zeros(1, 1, dtype=torch.long), torch.ones(1), (1,), check_invariants=True))
    except NotImplementedError:
        return False
    return True


# Registered once per process, for the sparse backends only, and only while torch has no kernel of its own
# (registering over one would replace it).
if not _torch_has_sparse_vector_norm():
    _SPARSE_NORM = torch.library.Library("aten", "IMPL")
    for _backend in ("SparseCPU", "SparseCUDA"):
        _SPARSE_NORM.impl("linalg_vector_norm", _sparse_vector_norm, _backend)


def touched_rows(param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of `param` (rows first) that its gradient touches and their gradients.

    Returns:
        rows (U,) int64 sorted distinct row ids and their gradients (U, width) (a sparse gradient is coalesced
        first: repeated rows summed, as gradient accumulation and all-reduce leave them repeated).
    """
    grad = param.grad
    if grad.is_sparse:
        grad = grad.coalesce()
        rows = grad.indices()[0]
        return rows, grad.values().reshape(rows.numel(), param[0].numel())  # (a block may get no row: U = 0)
    dense = grad.reshape(param.shape[0], -1)
    rows = dense.ne(0).any(dim=1).nonzero().squeeze(1)
    return rows, dense.index_select(0, rows)


def _check_table_params(optimizer: Optimizer) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.dim() == 0:
                raise ValueError(f"{type(optimizer).__name__} needs parameters with at least one dimension (rows first).")


class _Fp32StateOptimizer(Optimizer):
    """Keeps the optimizer state fp32 through `load_state_dict`, which casts floating state to each parameter's
    dtype (a bf16 table would get bf16 moments back, and resume inexactly)."""

    def load_state_dict(self, state_dict: dict) -> None:
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        super().load_state_dict(state_dict)
        for saved_id, param in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if torch.is_tensor(value) and value.is_floating_point() and key != "step":
                    self.state[param][key] = value.to(device=param.device, dtype=torch.float32, copy=True)


class LazyAdam(_Fp32StateOptimizer):
    """Adam on the touched rows only (lazy moments), for tables read a few rows at a time.

    For every row r with a gradient g_r this step (t counts the steps in which the parameter had a gradient):

        m_r = b1 m_r + (1 - b1) g_r;   v_r = b2 v_r + (1 - b2) g_r^2
        w_r -= lr * (m_r / (1 - b1^t)) / (sqrt(v_r / (1 - b2^t)) + eps)   (after w_r *= 1 - lr*wd)

    On a step that touches every row this is exactly `torch.optim.Adam` (AdamW with weight decay); rows without
    a gradient keep their weights and moments (dense Adam would still decay their moments and move them).

    Args:
        params: parameters or parameter groups, tables (rows, ...) with sparse or dense gradients.
        lr: learning rate.
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator.
        weight_decay: decoupled weight decay, applied to the rows a step updates (0 in the Engram recipe).

    Moments are fp32 whatever the table's dtype.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"LazyAdam: lr must be > 0, got {lr}.")
        if not all(0.0 <= beta < 1.0 for beta in betas) or len(betas) != 2:
            raise ValueError(f"LazyAdam: betas must be two numbers in [0, 1), got {betas}.")
        if eps <= 0:
            raise ValueError(f"LazyAdam: eps must be > 0, got {eps}.")
        if weight_decay < 0:
            raise ValueError(f"LazyAdam: weight_decay must be >= 0, got {weight_decay}.")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        _check_table_params(self)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                rows, row_grads = touched_rows(param)
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
                    state["exp_avg_sq"] = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
                # A step counts whenever the table has a gradient, even one touching no row, as torch's SparseAdam
                # counts it: a process's block of a sharded table may go untouched in a step in which the whole
                # table (one process) was touched, and both must apply the same bias correction.
                state["step"] += 1
                if rows.numel() == 0:
                    continue
                step = float(state["step"])
                row_grads = row_grads.float()
                exp_avg = state["exp_avg"].view(param.shape[0], -1)
                exp_avg_sq = state["exp_avg_sq"].view(param.shape[0], -1)
                # The operations of torch.optim.Adam, in its order, on the touched rows.
                m = exp_avg.index_select(0, rows).lerp_(row_grads, 1 - beta1)
                v = exp_avg_sq.index_select(0, rows).mul_(beta2).addcmul_(row_grads, row_grads, value=1 - beta2)
                exp_avg.index_copy_(0, rows, m)
                exp_avg_sq.index_copy_(0, rows, v)
                denominator = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
                weights = param.view(param.shape[0], -1)
                new_rows = weights.index_select(0, rows).float()
                if weight_decay:
                    new_rows.mul_(1 - lr * weight_decay)
                new_rows.addcdiv_(m, denominator, value=-lr / (1 - beta1**step))
                weights.index_copy_(0, rows, new_rows.to(param.dtype))
        return loss


class RowWiseAdagrad(_Fp32StateOptimizer):
    """Row-wise AdaGrad: one accumulator per row of each parameter (rows = the first dimension).

    Args:
        params: parameters or parameter groups, usually tables (rows, D).
        lr: learning rate.
        eps: added to the square root of the accumulator.
        weight_decay: decoupled weight decay, applied to the rows a step updates (lazy, as sparse
            optimizers do: a row that receives no gradient is left untouched).
        initial_accumulator_value: starting value of every row's accumulator (>= 0).

    Dense and sparse (`nn.Embedding(sparse=True)`) gradients are both accepted.
    """

    def __init__(self, params, lr: float = 1e-2, eps: float = 1e-8, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0):
        if lr <= 0:
            raise ValueError(f"RowWiseAdagrad: lr must be > 0, got {lr}.")
        if eps <= 0:
            raise ValueError(f"RowWiseAdagrad: eps must be > 0, got {eps}.")
        if weight_decay < 0:
            raise ValueError(f"RowWiseAdagrad: weight_decay must be >= 0, got {weight_decay}.")
        if initial_accumulator_value < 0:
            raise ValueError(f"RowWiseAdagrad: initial_accumulator_value must be >= 0, got {initial_accumulator_value}.")
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, initial_accumulator_value=initial_accumulator_value)
        super().__init__(params, defaults)
        _check_table_params(self)

    def _state_for(self, param: torch.Tensor, group: dict) -> dict:
        state = self.state[param]
        if not state:
            # fp32 accumulator whatever the table's dtype: a bf16 sum of squares stalls quickly.
            state["sum"] = torch.full(
                (param.shape[0],), group["initial_accumulator_value"], dtype=torch.float32, device=param.device
            )
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                rows, row_grads = touched_rows(param)
                accumulator = self._state_for(param, group)["sum"]
                if rows.numel() == 0:
                    continue
                rows_view = param.view(param.shape[0], -1)
                row_grads = row_grads.float()
                accumulator.index_add_(0, rows, row_grads.square().mean(dim=1))
                scale = accumulator.index_select(0, rows).sqrt_().add_(eps).reciprocal_()
                new_rows = rows_view.index_select(0, rows).float()
                if weight_decay:
                    new_rows.mul_(1 - lr * weight_decay)
                new_rows.addcmul_(row_grads, scale.unsqueeze(1), value=-lr)
                rows_view.index_copy_(0, rows, new_rows.to(param.dtype))
        return loss


class CombinedOptimizer(Optimizer):
    """Several optimizers over disjoint parameters, presented as one.

    `param_groups` are the sub-optimizers' own group dicts (read live), so a learning-rate
    scheduler built on this object changes the learning rate each sub-optimizer uses.
    `state_dict()` / `load_state_dict()` hold one state dict per sub-optimizer, in order.
    """

    def __init__(self, optimizers: list[Optimizer]):
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer.")
        seen = set()
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if id(param) in seen:
                        raise ValueError("CombinedOptimizer: a parameter belongs to more than one optimizer.")
                    seen.add(id(param))
        # torch's constructor validates the groups and installs the step hooks. While it runs,
        # `self.optimizers` is empty, so the live `param_groups` view below is empty too and the
        # constructor's own bookkeeping list is thrown away.
        self.optimizers = []
        super().__init__([group for optimizer in optimizers for group in optimizer.param_groups], {})
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @param_groups.setter
    def param_groups(self, value) -> None:
        # Only torch's constructor assigns here (an empty list it then fills with our own groups).
        pass

    @property
    def state(self) -> dict:
        return {param: state for optimizer in self.optimizers for param, state in optimizer.state.items()}

    @state.setter
    def state(self, value) -> None:
        pass  # each sub-optimizer owns its state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        states = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if states is None or len(states) != len(self.optimizers):
            raise ValueError(
                f"This CombinedOptimizer holds {len(self.optimizers)} optimizers; the state dict to load holds "
                f"{'none' if states is None else len(states)}. It was saved with a different optimizer setup "
                "(e.g. another --table_optimizer)."
            )
        for optimizer, state in zip(self.optimizers, states):
            optimizer.load_state_dict(state)

    def __repr__(self) -> str:
        inner = ", ".join(type(optimizer).__name__ for optimizer in self.optimizers)
        return f"CombinedOptimizer({inner})"


@torch.no_grad()
def optimizer_state_bytes(optimizer: Optimizer) -> int:
    """Bytes held in tensors of the optimizer's state (moments, accumulators, step counters)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


__all__ = ["CombinedOptimizer", "LazyAdam", "RowWiseAdagrad", "optimizer_state_bytes", "touched_rows"]
