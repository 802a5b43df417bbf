"""The table optimizers against independent references: LazyAdam against torch's SparseAdam (the same lazy
rule, another implementation) and against dense Adam/AdamW on the rows a step touches, RowWiseAdagrad against
a per-row reference written as plain loops; untouched rows and their state bit-identical after a step;
repeated and accumulated sparse gradients; torch's `clip_grad_norm_` on sparse gradients (the norm this module gives
them) against torch's on dense copies;
fp32 state through a checkpoint; CombinedOptimizer under a scheduler and through a state-dict round trip; and
both table optimizers inside MemoryTrainer (state size and an exact checkpoint resume).

Tolerances: fp32 updates computed with the same formula in another order agree to 1e-6; those computed
with the same operations in the same order are compared for equality."""

import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from training_helpers import tiny_model  # noqa: F401  (also sets one intra-op thread)
from modeling_memory.training.table_optimizers import (
    CombinedOptimizer,
    LazyAdam,
    RowWiseAdagrad,
    optimizer_state_bytes,
)

TOLERANCE = dict(rtol=1e-6, atol=1e-6)


def _sparse_table(rows=12, dim=4, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Embedding(rows, dim, sparse=True)


def _batches(steps, seed=0):
    """Row ids per step (rows 1 and 3 every step, row 3 twice; others now and then) and output gradients."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for step in range(steps):
        ids = torch.tensor([1, 3, 3, 5 + step % 3, [0, 8][step % 2]])
        batches.append((ids, torch.randn(5, 4, generator=generator)))
    return batches


def _backward(table, ids, grad_out):
    (table(ids) * grad_out).sum().backward()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lazy_adam_matches_sparse_adam_and_dense_adam_on_touched_rows(weight_decay):
    lazy_table = _sparse_table()
    start = lazy_table.weight.detach().clone()
    dense_table = torch.nn.Embedding.from_pretrained(start.clone(), freeze=False)
    lazy = LazyAdam(lazy_table.parameters(), lr=0.05, betas=(0.8, 0.9), eps=1e-8, weight_decay=weight_decay)
    dense_cls = torch.optim.AdamW if weight_decay else torch.optim.Adam
    dense = dense_cls(dense_table.parameters(), lr=0.05, betas=(0.8, 0.9), eps=1e-8, weight_decay=weight_decay)
    reference = None
    if not weight_decay:  # torch's SparseAdam has no weight decay
        sparse_adam_table = torch.nn.Embedding.from_pretrained(start.clone(), freeze=False, sparse=True)
        reference = (sparse_adam_table, torch.optim.SparseAdam(sparse_adam_table.parameters(), lr=0.05, betas=(0.8, 0.9)))
    for step, (ids, grad_out) in enumerate(_batches(5)):
        before = lazy_table.weight.detach().clone()
        state_before = {k: v.clone() for k, v in lazy.state[lazy_table.weight].items()} if step else None
        for table in (lazy_table, dense_table) + ((reference[0],) if reference else ()):
            _backward(table, ids, grad_out)
        lazy.step(), dense.step()
        lazy.zero_grad(), dense.zero_grad()
        untouched = torch.ones(12, dtype=torch.bool)
        untouched[ids] = False
        # Rows the step did not read, and their moments, are bit-identical.
        assert torch.equal(lazy_table.weight.detach()[untouched], before[untouched])
        if state_before is not None:
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(lazy.state[lazy_table.weight][key][untouched], state_before[key][untouched])
        if step == 0:  # zero moments: the first step is dense Adam's on the rows read (and on all rows without
            # weight decay, which AdamW applies to untouched rows too)
            rows = slice(None) if not weight_decay else ~untouched
            assert torch.equal(lazy_table.weight.detach()[rows], dense_table.weight.detach()[rows])
        if reference:
            reference[1].step(), reference[1].zero_grad()
            torch.testing.assert_close(lazy_table.weight.detach(), reference[0].weight.detach(), **TOLERANCE)
    # Rows 1 and 3 were touched every step, so their moments and bias corrections are dense Adam's.
    torch.testing.assert_close(lazy_table.weight.detach()[[1, 3]], dense_table.weight.detach()[[1, 3]], **TOLERANCE)
    assert not torch.allclose(lazy_table.weight.detach()[0], dense_table.weight.detach()[0])  # dense Adam moved it


def test_lazy_adam_counts_a_step_whose_gradient_touches_no_row_as_sparse_adam_does():
    """A block of a sharded table can receive an empty sparse gradient in a step: the step still counts, so later
    bias corrections are those of the whole table in one process (and of torch's SparseAdam)."""
    lazy_table, sparse_table = _sparse_table(), _sparse_table()
    lazy = LazyAdam(lazy_table.parameters(), lr=0.05, betas=(0.8, 0.9), eps=1e-8)
    sparse = torch.optim.SparseAdam(sparse_table.parameters(), lr=0.05, betas=(0.8, 0.9), eps=1e-8)
    for step, (ids, grad_out) in enumerate(_batches(4)):
        for table, optimizer in ((lazy_table, lazy), (sparse_table, sparse)):
            if step == 1:  # a gradient that touches no row
                table.weight.grad = torch.sparse_coo_tensor(torch.empty(1, 0, dtype=torch.long), torch.empty(0, 4), (12, 4))
            else:
                _backward(table, ids, grad_out)
            optimizer.step()
            optimizer.zero_grad()
    assert float(lazy.state[lazy_table.weight]["step"]) == 4
    torch.testing.assert_close(lazy_table.weight.detach(), sparse_table.weight.detach(), **TOLERANCE)


@pytest.mark.parametrize("optimizer_cls", [LazyAdam, RowWiseAdagrad])
def test_accumulated_sparse_gradients_equal_one_batch(optimizer_cls):
    """Gradient accumulation leaves a sparse gradient with repeated rows (uncoalesced): stepping on it equals
    stepping on the gradient of the whole batch at once."""
    ids, grad_out = _batches(1)[0]
    one, two = _sparse_table(), _sparse_table()
    _backward(one, ids, grad_out)
    _backward(two, ids[:2], grad_out[:2])
    _backward(two, ids[2:], grad_out[2:])
    assert not two.weight.grad.is_coalesced() or two.weight.grad._nnz() > one.weight.grad.coalesce()._nnz()
    for table in (one, two):
        optimizer = optimizer_cls(table.parameters(), lr=0.1)
        optimizer.step()
    torch.testing.assert_close(two.weight, one.weight, **TOLERANCE)


def test_torch_clip_grad_norm_counts_sparse_gradients_like_dense_copies():
    torch.manual_seed(0)
    table, linear = _sparse_table(), torch.nn.Linear(4, 3)
    ids = torch.tensor([2, 2, 7, 11])
    linear(table(ids)).square().sum().backward()
    dense_params = [torch.nn.Parameter(p.detach().clone()) for p in (table.weight, linear.weight, linear.bias)]
    for dense, param in zip(dense_params, (table.weight, linear.weight, linear.bias)):
        dense.grad = param.grad.to_dense().clone()
    expected = torch.nn.utils.clip_grad_norm_(dense_params, 0.5)
    total = torch.nn.utils.clip_grad_norm_([table.weight, linear.weight, linear.bias], 0.5)
    torch.testing.assert_close(total, expected, **TOLERANCE)
    assert total > 0.5  # it clipped
    assert table.weight.grad.is_sparse
    for dense, param in zip(dense_params, (table.weight, linear.weight, linear.bias)):
        torch.testing.assert_close(param.grad.to_dense(), dense.grad, **TOLERANCE)


@pytest.mark.parametrize("optimizer_cls", [LazyAdam, RowWiseAdagrad])
def test_half_table_state_stays_fp32_through_a_checkpoint(optimizer_cls):
    table = _sparse_table().to(torch.bfloat16)
    optimizer = optimizer_cls(table.parameters(), lr=0.1)
    ids, grad_out = _batches(1)[0]
    _backward(table, ids, grad_out.to(torch.bfloat16))
    optimizer.step()
    saved = optimizer.state_dict()
    restored = optimizer_cls(table.parameters(), lr=0.1)
    restored.load_state_dict(saved)
    for key, value in optimizer.state[table.weight].items():
        assert torch.equal(restored.state[table.weight][key], value), key
        if key != "step":
            assert restored.state[table.weight][key].dtype == torch.float32


def _reference_rowwise_adagrad(weight, gradients, lr, eps, weight_decay, initial):
    """Row by row, exactly as the formula in the module docstring says."""
    weight = weight.clone()
    accumulator = [initial] * weight.shape[0]
    for grad in gradients:
        for row in range(weight.shape[0]):
            if not bool(grad[row].ne(0).any()):
                continue
            accumulator[row] += float(grad[row].pow(2).mean())
            weight[row] = weight[row] * (1 - lr * weight_decay) - lr * grad[row] / (accumulator[row] ** 0.5 + eps)
    return weight, accumulator


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_rowwise_adagrad_matches_reference(sparse, weight_decay):
    torch.manual_seed(0)
    table = torch.nn.Embedding(11, 4, sparse=sparse)
    start = table.weight.detach().clone()
    optimizer = RowWiseAdagrad(table.parameters(), lr=0.3, eps=1e-8, weight_decay=weight_decay, initial_accumulator_value=0.1)
    gradients = []
    for step in range(4):
        ids = torch.tensor([[1, 3, 3, 7], [step, 9, 1, 2]])
        (table(ids) * torch.randn(2, 4, 4)).sum().backward()
        gradients.append(table.weight.grad.to_dense().clone())
        optimizer.step()
        optimizer.zero_grad()
    expected, accumulator = _reference_rowwise_adagrad(start, gradients, 0.3, 1e-8, weight_decay, 0.1)
    torch.testing.assert_close(table.weight.detach(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(optimizer.state[table.weight]["sum"], torch.tensor(accumulator), rtol=1e-6, atol=1e-6)
    untouched = [4, 5, 6, 8, 10]
    assert torch.equal(table.weight.detach()[untouched], start[untouched])
    assert optimizer_state_bytes(optimizer) == 11 * 4  # one fp32 scalar per row


def test_rowwise_adagrad_rejects_bad_settings():
    param = torch.nn.Parameter(torch.zeros(3, 2))
    for kwargs, message in [({"lr": 0}, "lr must be > 0"), ({"eps": 0}, "eps must be > 0"),
                            ({"weight_decay": -1}, "weight_decay must be >= 0"),
                            ({"initial_accumulator_value": -1}, "initial_accumulator_value")]:
        with pytest.raises(ValueError, match=message):
            RowWiseAdagrad([param], **kwargs)
    with pytest.raises(ValueError, match="at least one dimension"):
        RowWiseAdagrad([torch.nn.Parameter(torch.tensor(1.0))])


def _combined(seed=0):
    torch.manual_seed(seed)
    dense, table = torch.nn.Linear(4, 4), torch.nn.Embedding(10, 4)
    optimizer = CombinedOptimizer([torch.optim.AdamW(dense.parameters(), lr=0.01), RowWiseAdagrad(table.parameters(), lr=0.05)])
    return dense, table, optimizer


def _step(dense, table, optimizer, scheduler, step):
    generator = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 10, (3, 2), generator=generator)
    dense(table(ids)).square().mean().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_combined_optimizer_follows_scheduler_and_resumes_exactly():
    dense, table, optimizer = _combined()
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=6)
    for step in range(6):
        _step(dense, table, optimizer, scheduler, step)
        lrs = [group["lr"] for group in optimizer.param_groups]
        assert lrs[-1] == pytest.approx(5 * lrs[0])
    assert [group["lr"] for group in optimizer.optimizers[1].param_groups] == [optimizer.param_groups[-1]["lr"]]

    # Three steps, save, reload into fresh objects, three more == six uninterrupted steps.
    dense_b, table_b, optimizer_b = _combined()
    scheduler_b = get_linear_schedule_with_warmup(optimizer_b, num_warmup_steps=2, num_training_steps=6)
    for step in range(3):
        _step(dense_b, table_b, optimizer_b, scheduler_b, step)
    saved = (dense_b.state_dict(), table_b.state_dict(), optimizer_b.state_dict(), scheduler_b.state_dict())
    dense_c, table_c, optimizer_c = _combined(seed=1)
    scheduler_c = get_linear_schedule_with_warmup(optimizer_c, num_warmup_steps=2, num_training_steps=6)
    dense_c.load_state_dict(saved[0]), table_c.load_state_dict(saved[1])
    optimizer_c.load_state_dict(saved[2]), scheduler_c.load_state_dict(saved[3])
    for step in range(3, 6):
        _step(dense_c, table_c, optimizer_c, scheduler_c, step)
    torch.testing.assert_close(table_c.weight, table.weight, rtol=0, atol=1e-7)
    torch.testing.assert_close(dense_c.weight, dense.weight, rtol=0, atol=1e-7)

    with pytest.raises(ValueError, match="holds 2 optimizers"):
        optimizer_c.load_state_dict({"optimizers": [saved[2]["optimizers"][0]]})
    with pytest.raises(ValueError, match="more than one optimizer"):
        CombinedOptimizer([torch.optim.SGD(dense.parameters(), lr=1), torch.optim.SGD(dense.parameters(), lr=1)])


@pytest.mark.parametrize("table_optimizer", ["adam", "rowwise_adagrad"])
def test_table_optimizers_inside_memory_trainer(tmp_path, table_optimizer):
    import datasets

    from conftest import random_ids
    from modeling_memory.training.trainer import MemoryTrainer, MemoryTrainingArguments

    generator = torch.Generator().manual_seed(0)
    ids = random_ids(16, 12, generator)
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})

    def run(output_dir, resume=None):
        model = tiny_model(vocab_size=97)
        args = MemoryTrainingArguments(
            output_dir=str(output_dir), table_optimizer=table_optimizer, max_steps=4, per_device_train_batch_size=4,
            learning_rate=1e-2, save_strategy="steps", save_steps=2, report_to="none", disable_tqdm=True,
            logging_steps=1, dataloader_pin_memory=False, seed=0, max_grad_norm=1.0,
        )
        trainer = MemoryTrainer(model=model, args=args, train_dataset=dataset)
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    model, trainer = run(tmp_path / "a")
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper around ours
    table_optimizer_cls = {"adam": LazyAdam, "rowwise_adagrad": RowWiseAdagrad}[table_optimizer]
    assert isinstance(optimizer, CombinedOptimizer) and isinstance(optimizer.optimizers[-1], table_optimizer_cls)
    tables = [model.model.layers[0].engram.table.weight, model.model.chapter_bank.weight]
    assert [p for g in optimizer.optimizers[-1].param_groups for p in g["params"]] == tables
    if table_optimizer == "rowwise_adagrad":  # one fp32 accumulator per row
        expected_bytes = sum(4 * t.shape[0] for t in tables)
    else:  # two fp32 moments per weight and an fp32 step count per table
        expected_bytes = sum(8 * t.numel() + 4 for t in tables)
    assert optimizer_state_bytes(optimizer.optimizers[-1]) == expected_bytes
    lrs = [group["lr"] for group in optimizer.optimizers[-1].param_groups]
    assert lrs == pytest.approx([5 * optimizer.param_groups[0]["lr"], 2 * optimizer.param_groups[0]["lr"]])
    assert all("grad_norm" in entry for entry in trainer.state.log_history if "loss" in entry)

    # Resuming from step 2 gives bit for bit the weights of the uninterrupted run.
    resumed, _ = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    for (name, expected), actual in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(actual, expected), name
