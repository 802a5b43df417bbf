"""RowWiseAdagrad against a per-row reference written as plain loops, CombinedOptimizer under a
scheduler and through a state-dict round trip, and the lean table optimizer inside MemoryTrainer
(state size and a checkpoint resume).

Tolerances: fp32 updates computed with the same formula in another order agree to 1e-6."""

import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from training_helpers import tiny_model  # noqa: F401  (also sets one intra-op thread)
from modeling_memory.table_optimizer import CombinedOptimizer, RowWiseAdagrad, optimizer_state_bytes


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


def test_lean_table_optimizer_inside_memory_trainer(tmp_path):
    import datasets

    from conftest import random_ids
    from modeling_memory.trainer import MemoryTrainer, MemoryTrainingArguments

    generator = torch.Generator().manual_seed(0)
    ids = random_ids(16, 12, generator)
    dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})

    def run(output_dir, resume=None):
        model = tiny_model(vocab_size=97)
        args = MemoryTrainingArguments(
            output_dir=str(output_dir), table_optimizer="rowwise_adagrad", max_steps=4, per_device_train_batch_size=4,
            learning_rate=1e-2, save_strategy="steps", save_steps=2, report_to="none", disable_tqdm=True,
            logging_steps=1, dataloader_pin_memory=False, seed=0,
        )
        trainer = MemoryTrainer(model=model, args=args, train_dataset=dataset)
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    model, trainer = run(tmp_path / "a")
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper around ours
    assert isinstance(optimizer, CombinedOptimizer) and isinstance(optimizer.optimizers[-1], RowWiseAdagrad)
    table = model.model.layers[0].engram.table.weight
    assert optimizer_state_bytes(optimizer.optimizers[-1]) == table.shape[0] * 4
    assert optimizer.optimizers[-1].param_groups[0]["lr"] == pytest.approx(5 * optimizer.param_groups[0]["lr"])

    resumed, _ = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    for (name, expected), actual in zip(model.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6, msg=name)
