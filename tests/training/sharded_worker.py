"""One process of a sharded-table training run, launched by test_sharded_tables.py under `torch.distributed.run`
(gloo, CPU): a tiny MemoryLlama with its tables sharded by row owner, wrapped by DDP (tables ignored) or FSDP2
(`fully_shard` per decoder layer and at the root, tables as ignored parameters), trained a few steps on this
process's share of a fixed global batch, with clipping; then saved with `save_pretrained` and through
torch.distributed.checkpoint. Writes what the test compares into OUT/rank-<rank>.json.

    python -m torch.distributed.run --nproc_per_node 2 sharded_worker.py MODEL_DIR OUT {ddp,ddp-disk,fsdp2,tp}

`ddp-disk` puts each process's blocks on disk (one offload folder shared by the processes).

`tp` loads the model with transformers' tensor parallelism for the backbone (`tp_plan="auto"`) and the tables sharded
by row owner, and only runs a forward.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

torch.set_num_threads(1)

STEPS, GLOBAL_BATCH, LENGTH, LEARNING_RATE, MAX_GRAD_NORM = 3, 4, 16, 1e-2, 0.5


def global_batch(vocab_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randint(3, vocab_size, (STEPS, GLOBAL_BATCH, LENGTH), generator=generator)


def build_optimizer(model):
    from modeling_memory.training.trainer import build_memory_optimizer, memory_parameter_groups

    decay = [name for name, _ in model.named_parameters() if "norm" not in name]
    groups = memory_parameter_groups(model, learning_rate=LEARNING_RATE, weight_decay=0.0, decay_parameter_names=decay)
    return build_memory_optimizer(groups, "adam", torch.optim.AdamW, {})


def tensor_parallel_forward(model_dir: str, out: str) -> None:
    from modeling_memory import MemoryLlamaForCausalLM

    model = MemoryLlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, tp_plan="auto", shard_memory_tables=True)
    rank = dist.get_rank()
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    ids = global_batch(model.config.vocab_size)[0]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    # Every process generates from the same prompts, so each decode step's reads are collective.
    generated = model.generate(ids[:2, :8], max_new_tokens=6, min_new_tokens=6, do_sample=False)
    if rank == 0:
        torch.save(logits, os.path.join(out, "logits.pt"))
        torch.save(generated, os.path.join(out, "generated.pt"))
    model.save_pretrained(os.path.join(out, "saved"), is_main_process=rank == 0)  # TP weights gathered by transformers
    with open(os.path.join(out, f"rank-{rank}.json"), "w") as handle:
        json.dump({"rank": rank, "q_proj_local_rows": q_proj.to_local().shape[0], "q_proj_rows": q_proj.shape[0],
                   "table_rows": model.model.layers[0].engram.table.weight.shape[0]}, handle)
    dist.barrier()
    dist.destroy_process_group()


def replicated_like(table):
    """The whole table as a DTensor replicated on the table's mesh: a layout a sharded table does not take."""
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(torch.zeros(table.shape), table.device_mesh, (Replicate(),), run_check=False)


def main(model_dir: str, out: str, wrapper: str) -> None:
    if wrapper == "tp":  # transformers initialises the process group itself
        return tensor_parallel_forward(model_dir, out)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    from modeling_memory import MemoryLlamaForCausalLM
    from modeling_memory.training.sharded_tables import (
        clip_grad_norm_with_shards,
        keep_tables_out_of_ddp,
        sharded_tables,
        state_dict_to_save,
    )

    model = MemoryLlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, shard_memory_tables=True)
    if wrapper == "ddp-disk":
        model.set_memory_placement("disk", os.path.join(out, "offload"))
    tables = sharded_tables(model)
    blocks = {name: [module.row_sharding.start, module.row_sharding.stop, module.weight.numel()] for name, module in tables.items()}
    optimizer = build_optimizer(model)  # on the blocks: built after sharding, before wrapping (FSDP2 swaps parameters)
    if wrapper.startswith("ddp"):
        keep_tables_out_of_ddp(model, tables)
        trained = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        ignored = {module.weight for module in tables.values()}
        for layer in model.model.layers:
            fully_shard(layer, ignored_params=ignored)
        fully_shard(model, ignored_params=ignored)
        optimizer = build_optimizer(model)  # FSDP2 replaced the backbone's parameters by DTensors
        trained = model
    data = global_batch(model.config.vocab_size)
    share = GLOBAL_BATCH // world_size
    losses, norms = [], []
    for step in range(STEPS):
        ids = data[step, rank * share : (rank + 1) * share]
        loss = trained(input_ids=ids, labels=ids).loss
        loss.backward()
        norms.append(float(clip_grad_norm_with_shards(trained.parameters(), MAX_GRAD_NORM, tables)))
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world_size)

    with torch.no_grad():  # every process reads the same probe batch (reads are collective)
        probe_logits = trained(input_ids=data[0]).logits
    if rank == 0:
        torch.save(probe_logits, os.path.join(out, "logits.pt"))

    state_dict = model.state_dict()
    table_types = {name: type(state_dict[name]).__name__ for name in tables}
    model.save_pretrained(os.path.join(out, "saved"), state_dict=state_dict_to_save(model, tables), is_main_process=rank == 0)

    # torch.distributed.checkpoint sees each table as a DTensor of the whole table and writes each block once.
    import torch.distributed.checkpoint as dcp

    dcp.save({key: state_dict[key] for key in tables}, checkpoint_id=os.path.join(out, "dcp"))
    reloaded = {key: torch.zeros_like(state_dict[key]) for key in tables}  # DTensors of zeros, same layout
    dcp.load(reloaded, checkpoint_id=os.path.join(out, "dcp"))
    dcp_round_trip = all(torch.equal(reloaded[key].to_local(), tables[key].weight.detach()) for key in tables)
    # A table of another shape, or a DTensor laid out for another number of processes, is refused by name.
    key = next(iter(tables))
    refusals = []
    for wrong in (torch.zeros(3, 3), replicated_like(state_dict[key])):
        try:
            model.load_state_dict({key: wrong}, strict=False)
        except ValueError as error:
            refusals.append(key in str(error))

    with open(os.path.join(out, f"rank-{rank}.json"), "w") as handle:
        json.dump(
            {
                "rank": rank,
                "world_size": world_size,
                "losses": losses,
                "norms": norms,
                "blocks": blocks,
                "table_types": table_types,
                "dcp_round_trip": dcp_round_trip,
                "bad_layouts_refused": refusals == [True, True],
            },
            handle,
        )
    dist.barrier()  # no process tears the groups down while another still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
