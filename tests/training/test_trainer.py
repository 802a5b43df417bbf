"""MemoryTrainer against independent references: parameter groups and their learning rates under the
scheduler, the aux loss under gradient accumulation (against plain PyTorch gradients), the logged gradient
norm and clipping with sparse table gradients (against norms of the densified gradients), the optimizer
it builds in a plain PyTorch loop (against dense AdamW), memory-health statistics (against the router
logits and gate recomputed by hand) and the evaluation loss.

Tolerances (fp32 throughout): gradients that sum the same terms in another order agree to
rtol 1e-4 / atol 1e-6; the plain-Trainer failure case differs by far more (the aux term x2). Parameters
after one optimizer step from the same gradients agree to 1e-6.
"""

import math

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from conftest import random_ids, tiny_config, train_steps
from training_helpers import tiny_dataset, tiny_tokenizer, tiny_training_args  # noqa: F401  (also sets one intra-op thread)
from modeling_memory import MemoryLlamaForCausalLM
from modeling_memory.training.trainer import MemoryTrainer, MemoryTrainingArguments, memory_parameter_groups, set_sparse_table_gradients

GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6


class _GradientCapture(TrainerCallback):
    """Copies the accumulated gradients just before the first optimizer step."""

    def __init__(self, model):
        self.model, self.gradients, self.sparse_rows = model, None, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.gradients is None:  # tables' sparse gradients densified, to compare with any reference
            named = [(n, p.grad) for n, p in self.model.named_parameters() if p.grad is not None]
            self.gradients = {n: grad.detach().to_dense() for n, grad in named}
            self.sparse_rows = {n: grad.coalesce().indices()[0] for n, grad in named if grad.is_sparse}


def _trainer_gradients(tmp_path, trainer_cls, config, batch_size, accumulation, dataset, args_cls=MemoryTrainingArguments,
                       warm_up=False, **overrides):
    """The gradients just before the first optimizer step, and the trainer. `warm_up`: a few SGD steps first, so
    that the zero-initialised memory outputs (and with them the tables' gradients) are non-zero."""
    torch.manual_seed(0)
    model = MemoryLlamaForCausalLM(config)
    if warm_up:
        train_steps(model, steps=2)
    if trainer_cls is Trainer:  # its AdamW and clipping take dense gradients only
        set_sparse_table_gradients(model, False)
    capture = _GradientCapture(model)
    args = tiny_training_args(tmp_path, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation, **overrides)
    if args_cls is TrainingArguments:
        args = TrainingArguments(**{k: v for k, v in args.to_dict().items() if k in TrainingArguments.__dataclass_fields__ and TrainingArguments.__dataclass_fields__[k].init})
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, callbacks=[capture])
    trainer.train()
    return capture.gradients, trainer


def _assert_gradients_close(first, second):
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)


def test_parameter_groups_learning_rates_and_weight_decay(tmp_path):
    config = tiny_config(pkm_layers=[1], pkm_num_keys=6, pkm_top_k=3, pkm_heads=2, pkm_key_dim=8)
    model = MemoryLlamaForCausalLM(config)
    args = tiny_training_args(tmp_path, learning_rate=1e-3, weight_decay=0.1, warmup_steps=3, lr_scheduler_type="cosine", max_steps=10)
    trainer = MemoryTrainer(model=model, args=args, train_dataset=tiny_dataset())
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    groups = {group["name"]: group for group in trainer.optimizer.param_groups}
    # Expected membership from parameter names alone (an independent path from the module-type lookup).
    by_id = {id(p): n for n, p in model.named_parameters()}
    members = {name: {by_id[id(p)] for p in group["params"]} for name, group in groups.items()}
    assert members["engram_tables"] == {"model.layers.0.engram.table.weight"}
    assert members["chapter_banks"] == {"model.chapter_bank.weight"}
    assert members["pkm_values"] == {"model.pkm_values.weight"}
    assert "model.layers.1.product_key_memory.pkm_query.weight" in members["decay"]
    assert all("norm" in n or "layernorm" in n for n in members["no_decay"])
    assert {"model.layers.0.engram.hidden_norm.weight", "model.layers.2.memory_layernorm.weight"} <= members["no_decay"]
    assert "model.layers.2.chapter_memory.memory_query.weight" in members["decay"]
    assert sum(len(m) for m in members.values()) == len(list(model.parameters()))
    assert groups["decay"]["weight_decay"] == 0.1
    assert groups["no_decay"]["weight_decay"] == groups["engram_tables"]["weight_decay"] == groups["chapter_banks"]["weight_decay"] == 0.0

    ratios = []
    for _ in range(8):
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        lrs = {name: group["lr"] for name, group in groups.items()}
        assert lrs["decay"] > 0
        ratios.append((lrs["engram_tables"] / lrs["decay"], lrs["chapter_banks"] / lrs["decay"],
                       lrs["pkm_values"] / lrs["decay"], lrs["no_decay"] / lrs["decay"]))
    for table_ratio, bank_ratio, values_ratio, plain_ratio in ratios:
        assert table_ratio == pytest.approx(5.0, rel=1e-12)
        assert bank_ratio == pytest.approx(2.0, rel=1e-12)
        assert values_ratio == pytest.approx(10.0, rel=1e-12)
        assert plain_ratio == pytest.approx(1.0, rel=1e-12)


def test_arguments_override_config_multipliers_and_validate(tmp_path):
    model = MemoryLlamaForCausalLM(tiny_config())
    args = tiny_training_args(tmp_path, engram_lr_multiplier=10.0, chapter_bank_lr_multiplier=0.5)
    trainer = MemoryTrainer(model=model, args=args, train_dataset=tiny_dataset())
    groups = {group["name"]: group["lr"] for group in trainer.create_optimizer().param_groups}
    assert groups["engram_tables"] == pytest.approx(0.1) and groups["chapter_banks"] == pytest.approx(0.005)
    with pytest.raises(ValueError, match="table_optimizer must be one of"):
        tiny_training_args(tmp_path, table_optimizer="adam8bit")
    with pytest.raises(ValueError, match="engram_lr_multiplier must be a finite number >= 0"):
        tiny_training_args(tmp_path, engram_lr_multiplier=-1.0)
    with pytest.raises(ValueError, match="pkm_values_lr_multiplier must be a finite number >= 0"):
        tiny_training_args(tmp_path, pkm_values_lr_multiplier=float("inf"))


def test_aux_loss_under_gradient_accumulation_matches_one_big_batch(tmp_path):
    """GA = 1 x batch 8 and GA = 2 x batch 4 give the same gradients. The z-loss is a mean over tokens
    (linear in the batch); with equal tokens per micro-batch the mean of micro-batch means is the
    whole-batch mean, so any difference is a scaling error. A plain Trainer over-weights it."""
    config = tiny_config(router_aux_loss_coef=0.0, router_z_loss_coef=1.0)
    dataset = tiny_dataset()
    one_batch, _ = _trainer_gradients(tmp_path / "a", MemoryTrainer, config, 8, 1, dataset)
    accumulated, _ = _trainer_gradients(tmp_path / "b", MemoryTrainer, config, 4, 2, dataset)
    _assert_gradients_close(one_batch, accumulated)

    # A plain Trainer gets the router losses only from the config (Mixtral's convention).
    plain_config = tiny_config(router_aux_loss_coef=0.0, router_z_loss_coef=1.0, output_router_logits=True)
    plain_one, _ = _trainer_gradients(tmp_path / "c", Trainer, plain_config, 8, 1, dataset, TrainingArguments)
    plain_accumulated, _ = _trainer_gradients(tmp_path / "d", Trainer, plain_config, 4, 2, dataset, TrainingArguments)
    router = "model.layers.2.chapter_memory.router.weight"  # its gradient comes from the aux loss only
    torch.testing.assert_close(plain_one[router], one_batch[router], rtol=GRAD_RTOL, atol=GRAD_ATOL)
    torch.testing.assert_close(plain_accumulated[router], 2 * accumulated[router], rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_accumulated_gradients_match_plain_pytorch_reference(tmp_path):
    """With the load-balancing loss too (not linear in the batch), GA = 2 x 4 equals the plain PyTorch
    gradient of: token-summed cross-entropy / all loss tokens + the mean of the two micro-batch aux losses."""
    config = tiny_config(router_aux_loss_coef=0.5, router_z_loss_coef=0.1)
    dataset = tiny_dataset()
    trainer_gradients, _ = _trainer_gradients(tmp_path, MemoryTrainer, config, 4, 2, dataset)

    torch.manual_seed(0)
    model = MemoryLlamaForCausalLM(config).train()
    ids, labels = torch.tensor(dataset["input_ids"]), torch.tensor(dataset["labels"])
    loss_tokens = labels[:, 1:].ne(-100).sum()
    for rows in (slice(0, 4), slice(4, 8)):
        out = model(ids[rows], output_router_logits=True)
        logits = out.logits[:, :-1].reshape(-1, config.vocab_size).float()
        cross_entropy = F.cross_entropy(logits, labels[rows, 1:].reshape(-1), ignore_index=-100, reduction="sum")
        (cross_entropy / loss_tokens + out.aux_loss / 2).backward()
    reference = {n: p.grad.to_dense() for n, p in model.named_parameters() if p.grad is not None}
    _assert_gradients_close(trainer_gradients, reference)


def test_table_gradients_are_sparse_and_counted_in_grad_norm_and_clipping(tmp_path):
    """Under gradient accumulation the tables' gradients stay sparse (only the rows read); Trainer's logged
    grad_norm is the norm of all gradients, tables included, and clipping scales them all alike."""
    config = tiny_config(chapter_num_chapters=40, chapter_top_k=1)  # a bank larger than a batch reads
    dataset = tiny_dataset()
    unclipped, trainer = _trainer_gradients(tmp_path / "a", MemoryTrainer, config, 4, 2, dataset, warm_up=True)
    capture = next(c for c in trainer.callback_handler.callbacks if isinstance(c, _GradientCapture))
    assert set(capture.sparse_rows) == {"model.layers.0.engram.table.weight", "model.chapter_bank.weight"}
    for name, rows in capture.sparse_rows.items():
        assert 0 < rows.numel() < unclipped[name].shape[0]  # the rows read, not the table
        outside = torch.ones(unclipped[name].shape[0], dtype=torch.bool)
        outside[rows] = False
        assert unclipped[name][~outside].abs().sum() > 0 and not unclipped[name][outside].any()
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in unclipped.values()]))
    assert trainer.state.log_history[0]["grad_norm"] == pytest.approx(float(norm), rel=1e-5)

    max_norm = float(norm) / 4
    clipped, trainer = _trainer_gradients(tmp_path / "b", MemoryTrainer, config, 4, 2, dataset, warm_up=True,
                                          max_grad_norm=max_norm)
    assert trainer.state.log_history[0]["grad_norm"] == pytest.approx(float(norm), rel=1e-5)  # the norm before clipping
    for name, gradient in clipped.items():
        torch.testing.assert_close(gradient, unclipped[name] * (max_norm / (norm + 1e-6)), rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_optimizer_of_memory_trainer_in_a_plain_pytorch_loop(tmp_path):
    """`create_optimizer()` outside Trainer: loss.backward(); step(); zero_grad(). The first step equals dense
    AdamW with the same groups (zero moments: the lazy table update is Adam's on every row); table rows a
    step did not read stay bit-identical."""
    config = tiny_config()
    torch.manual_seed(0)
    model = train_steps(MemoryLlamaForCausalLM(config), steps=2)  # non-zero memory outputs: tables get gradients
    reference = MemoryLlamaForCausalLM(config)
    reference.load_state_dict(model.state_dict())
    set_sparse_table_gradients(reference, False)
    args = tiny_training_args(tmp_path, learning_rate=1e-2, weight_decay=0.0)
    optimizer = MemoryTrainer(model=model, args=args, train_dataset=tiny_dataset()).create_optimizer()
    groups = memory_parameter_groups(reference, 1e-2, 0.0, [n for n, _ in reference.named_parameters()])
    dense_optimizer = torch.optim.AdamW(groups, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    table = model.model.layers[0].engram.table.weight
    generator = torch.Generator().manual_seed(0)
    for step in range(3):
        ids = random_ids(2, 10, generator)
        before = table.detach().clone()
        for one_model, one_optimizer in ((model, optimizer), (reference, dense_optimizer)):
            one_model.train()
            one_model(ids, labels=ids).loss.backward()
            if one_model is model:
                read = table.grad.coalesce().indices()[0]
            one_optimizer.step()
            one_optimizer.zero_grad()
        untouched = torch.ones(table.shape[0], dtype=torch.bool)
        untouched[read] = False
        assert untouched.any() and torch.equal(table.detach()[untouched], before[untouched])
        assert not torch.equal(table.detach()[read], before[read])
        if step == 0:
            for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
                torch.testing.assert_close(param, expected, rtol=1e-6, atol=1e-6, msg=name)


def test_memory_health_logs_match_recomputed_statistics(tmp_path):
    config = tiny_config()
    dataset = tiny_dataset(rows=4, masked_labels=False)
    torch.manual_seed(0)
    model = MemoryLlamaForCausalLM(config)
    reference_model = MemoryLlamaForCausalLM(config)
    reference_model.load_state_dict(model.state_dict())
    args = tiny_training_args(tmp_path, per_device_train_batch_size=4)
    trainer = MemoryTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    logged = trainer.state.log_history[0]

    # Recompute from the same batch by hand (the statistics come from the forward before the step).
    ids = torch.tensor(dataset["input_ids"])
    captured = {}
    engram = reference_model.model.layers[0].engram
    handle = engram.register_forward_pre_hook(lambda module, args: captured.update(hidden=args[0].detach()))
    with torch.no_grad():
        out = reference_model.train()(ids, output_router_logits=True)
    handle.remove()
    (router_logits,) = out.router_logits
    counts = torch.bincount(router_logits.topk(config.chapter_top_k, dim=-1).indices.reshape(-1), minlength=config.chapter_num_routed).double()
    probs = counts / counts.sum()
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum() / math.log(config.chapter_num_routed)
    assert logged["chapter_usage_entropy"] == pytest.approx(float(entropy), rel=1e-6)
    assert logged["chapters_used_fraction"] == pytest.approx(float((counts > 0).double().mean()))
    assert logged["aux_loss"] == pytest.approx(float(out.aux_loss), rel=1e-5)

    def rms_norm(x, weight, eps):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    with torch.no_grad():
        boundaries = reference_model.model.engram_boundaries(ids, torch.ones_like(ids, dtype=torch.bool))
        embeddings = engram.lookup(*engram.ngram_context(ids, boundaries, None), reference_model.model.engram_canonical_map)
        keys = embeddings @ engram.engram_key.weight.T
        eps = config.rms_norm_eps
        score = (rms_norm(captured["hidden"], engram.hidden_norm.weight, eps) * rms_norm(keys, engram.key_norm.weight, eps)).sum(-1)
        score = score / math.sqrt(config.hidden_size)
        gate = torch.sigmoid(score.sign() * score.abs().clamp_min(1e-6).sqrt())
    assert logged["engram_gate_mean"] == pytest.approx(float(gate.mean()), rel=1e-5)


def test_health_logging_can_be_switched_off_and_plain_trainer_trains(tmp_path):
    dataset = tiny_dataset()
    model = MemoryLlamaForCausalLM(tiny_config())
    trainer = MemoryTrainer(model=model, args=tiny_training_args(tmp_path, log_memory_health=False, max_steps=2, per_device_train_batch_size=4), train_dataset=dataset)
    trainer.train()
    assert "chapter_usage_entropy" not in trainer.state.log_history[0]

    torch.manual_seed(0)
    model = MemoryLlamaForCausalLM(tiny_config())
    set_sparse_table_gradients(model, False)  # a plain Trainer's AdamW and clipping take dense gradients only
    args = TrainingArguments(output_dir=str(tmp_path / "plain"), report_to="none", save_strategy="no", disable_tqdm=True,
                             max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1)
    Trainer(model=model, args=args, train_dataset=dataset).train()
    assert all(math.isfinite(p.detach().abs().sum()) for p in model.parameters())


@pytest.mark.parametrize("placement", ["device", "host", "disk"])
def test_dense_table_gradients_reach_every_table_kind_in_every_placement(placement, tmp_path):
    """`set_sparse_table_gradients(model, False)` gives Engram tables, chapter banks and product-key values dense
    gradients wherever the tables live, equal to the sparse gradients of a device model densified, so that a plain
    AdamW steps on them."""
    config = tiny_config(pkm_layers=[1], pkm_num_keys=8, pkm_top_k=4, pkm_heads=2, pkm_key_dim=16)
    torch.manual_seed(0)
    sparse = train_steps(MemoryLlamaForCausalLM(config), steps=2)  # non-zero memory outputs: tables get gradients
    dense = MemoryLlamaForCausalLM(config)
    dense.load_state_dict(sparse.state_dict())
    if placement != "device":
        dense.set_memory_placement(placement, str(tmp_path) if placement == "disk" else None)
    set_sparse_table_gradients(dense, False)
    ids = random_ids(2, 10, torch.Generator().manual_seed(0))
    for model in (sparse, dense):
        model.train()
        model(ids, labels=ids).loss.backward()
    tables = dense.memory_tables()
    assert set(tables) == {"model.layers.0.engram.table.weight", "model.chapter_bank.weight", "model.pkm_values.weight"}
    for name in tables:
        gradient = dense.get_parameter(name).grad
        assert gradient.layout == torch.strided and gradient.abs().sum() > 0
        torch.testing.assert_close(gradient, sparse.get_parameter(name).grad.to_dense())
    torch.optim.AdamW(dense.parameters(), lr=1e-3).step()


def test_eval_loss_is_the_language_model_loss(tmp_path):
    dataset = tiny_dataset(rows=4, masked_labels=False)
    torch.manual_seed(0)
    model = MemoryLlamaForCausalLM(tiny_config(router_aux_loss_coef=1.0))
    trainer = MemoryTrainer(model=model, args=tiny_training_args(tmp_path, per_device_eval_batch_size=4), eval_dataset=dataset)
    metrics = trainer.evaluate()
    ids = torch.tensor(dataset["input_ids"])
    with torch.no_grad():
        logits = model.eval()(ids).logits
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert metrics["eval_loss"] == pytest.approx(float(reference), rel=1e-5)


def test_memory_trainer_evaluates_a_plain_llama(tmp_path):
    """The demo scores the base model with the same evaluation as the memory models: MemoryTrainer takes a model
    without memory (nothing to record) and its eval_loss is the language-model loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dataset = tiny_dataset(rows=4, masked_labels=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tiny_config().vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4)).eval()
    metrics = MemoryTrainer(model=model, args=tiny_training_args(tmp_path, per_device_eval_batch_size=4), eval_dataset=dataset).evaluate()
    ids = torch.tensor(dataset["input_ids"])
    with torch.no_grad():
        logits = model(ids).logits
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert metrics["eval_loss"] == pytest.approx(float(reference), rel=1e-5)


def test_memory_trainer_refuses_optimizers_that_build_their_own_groups(tmp_path):
    model = MemoryLlamaForCausalLM(tiny_config())
    own_groups = (torch.optim.AdamW, {"lr": 1e-3, "params": [{"params": list(model.parameters())}]})
    trainer = MemoryTrainer(model=model, args=tiny_training_args(tmp_path), train_dataset=tiny_dataset(), optimizer_cls_and_kwargs=own_groups)
    with pytest.raises(ValueError, match="builds its own parameter groups"):
        trainer.create_optimizer()


def test_training_is_repeatable_bit_for_bit_on_several_threads():
    """Two identical runs on 2 intra-op threads give identical weights: repeated reads of a chapter (or a table
    row) are summed in a fixed order in the backward pass, so the demo's figures repeat run to run."""
    from modeling_memory.training.trainer import build_memory_optimizer

    def run():
        torch.manual_seed(0)
        model = MemoryLlamaForCausalLM(tiny_config(pkm_layers=[1], pkm_num_keys=16, pkm_top_k=4, pkm_heads=2, pkm_key_dim=8))
        names = [name for name, _ in model.named_parameters()]
        optimizer = build_memory_optimizer(memory_parameter_groups(model, 1e-2, 0.0, decay_parameter_names=names),
                                           "adam", torch.optim.AdamW, {})
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):  # from the second step on, the bank is no longer zero
            ids = random_ids(8, 64, generator)
            model(ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return model.state_dict()

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first, second = run(), run()
    finally:
        torch.set_num_threads(threads)
    for name, weight in first.items():
        assert torch.equal(weight, second[name]), name
