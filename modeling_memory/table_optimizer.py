"""Lean optimizer state for huge embedding tables (the Engram tables).

Dense Adam keeps two full-size moments: for a table of R rows x D columns that is 2·R·D extra
floats, twice the table. Recommender systems train their embedding tables with *row-wise AdaGrad*
instead (FBGEMM's EXACT_ROWWISE_ADAGRAD): one scalar per row, the running sum of the row's mean
squared gradient, so the state is R floats, a fraction 1/D of the table.

    G_r += mean_j(g_rj^2)                       (only rows that received a gradient)
    w_r -= lr * g_r / (sqrt(G_r) + eps)         (after decoupled weight decay w_r *= 1 - lr*wd)

Rows a step does not touch are not read or written (an Engram step touches a few rows per token).

`CombinedOptimizer` puts several optimizers over disjoint parameters behind one `Optimizer`, so
`MemoryTrainer` can train the tables with `RowWiseAdagrad` and everything else with AdamW while
the learning-rate scheduler, accelerate and Trainer checkpoints see a single optimizer.
"""

import torch
from torch.optim import Optimizer


class RowWiseAdagrad(Optimizer):
    """Row-wise AdaGrad: one accumulator per row of each parameter (rows = the first dimension).

    Args:
        params: parameters or parameter groups, usually embedding tables (R, D).
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
        for group in self.param_groups:
            for param in group["params"]:
                if param.dim() == 0:
                    raise ValueError("RowWiseAdagrad needs parameters with at least one dimension (rows first).")

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
                rows_view = param.view(param.shape[0], -1)
                if param.grad.is_sparse:
                    grad = param.grad.coalesce()
                    rows = grad.indices()[0]
                    row_grads = grad.values().reshape(rows.numel(), -1)
                else:
                    dense = param.grad.reshape(param.shape[0], -1)
                    rows = dense.ne(0).any(dim=1).nonzero().squeeze(1)
                    row_grads = dense.index_select(0, rows)
                if rows.numel() == 0:
                    continue
                accumulator = self._state_for(param, group)["sum"]
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


def optimizer_state_bytes(optimizer: Optimizer) -> int:
    """Bytes held in tensors of the optimizer's state (moments, accumulators, step counters)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


__all__ = ["CombinedOptimizer", "RowWiseAdagrad", "optimizer_state_bytes"]
