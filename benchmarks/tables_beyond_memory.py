"""An Engram table larger than the machine's RAM, on disk, serving `generate` and training, against the same model
with a table that fits in RAM, side by side in one run on the demo backbone (SmolLM2-135M, Engram preset: layers
2 and 15, 2 orders x 8 heads).

    python -m benchmarks.tables_beyond_memory                  # a table of 2.1x the machine's RAM (~10 min here)
    python -m benchmarks.tables_beyond_memory --table-gib 4    # a quicker look

The disk table is grafted with `memory_placement="disk"`: it is created straight in its working copy (random rows,
every byte written: a sparse file would read zeros for free) and never passes through RAM; it is deleted at the end.
The baseline's table (`--baseline-rows` rows per head) lives in RAM. Both read real text (the offline Python docs).

Measured, each pair interleaved in one process (medians):
  1. cold start: building the disk table, and the first `generate` (rows read from the disk);
  2. decode tokens/s with a warm page cache (the same prompt again, greedy, batch 1): target >= 0.9x the baseline;
  3. a training step (batch 4 x 128 tokens; the tables on RowWiseAdagrad, whose row state fits in RAM at any table
     size, the rest on AdamW): the first step on new text (cold rows) and steps over batches already read
     (warm): target <= 1.5x the baseline.
"""

import os
import shutil
import time

import torch

from benchmarks.harness import benchmark_parser, finish_run, interleaved_medians, markdown_table, start_run


HEADS_PER_LAYER = 16  # the Engram preset: 2 orders x 8 heads
PROMPT_TOKENS, NEW_TOKENS = 64, 32
BATCH, SEQ_LEN = 4, 128


def machine_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def text_batches(tokenizer, count: int, rows: int, length: int) -> list[torch.Tensor]:
    """`count` batches of (rows, length) token ids cut from the offline Python docs, none repeating another."""
    from modeling_memory.data.natural_text import load_natural_text

    texts = load_natural_text()["train"]["text"]
    ids, needed = [], count * rows * length
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        if len(ids) >= needed:
            break
    return list(torch.tensor(ids[:needed]).view(count, rows, length))


def graft(base, tokenizer, table_rows: int, offload_dir: str | None):
    from modeling_memory.tools.graft import from_llama, memory_preset

    fields = dict(memory_preset(base.config, "engram"), engram_table_size=table_rows)
    placement = dict(memory_placement="disk", memory_offload_dir=offload_dir) if offload_dir else {}
    return from_llama(base, tokenizer, **placement, **fields).eval()


def table_gib(model) -> float:
    return sum(module.weight.numel() * module.weight.element_size() for module in model.memory_tables().values()) / 2**30


def drop_page_cache() -> bool:
    """Ask the kernel to drop clean cached pages (needs root), so that the first reads come from the disk."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("1\n")
        return True
    except OSError:
        return False


def generate_once(model, prompt: torch.Tensor, tokenizer):
    def run():
        with torch.no_grad():
            model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                do_sample=False, pad_token_id=tokenizer.eos_token_id,
            )

    return run


def prefill_once(model, prompt: torch.Tensor):
    def run():
        with torch.no_grad():
            model(prompt)

    return run


def training_setup(model):
    from modeling_memory.training.trainer import build_memory_optimizer, memory_parameter_groups

    groups = memory_parameter_groups(model, 1e-6, weight_decay=0.0, decay_parameter_names=[])
    return build_memory_optimizer(groups, "rowwise_adagrad", torch.optim.AdamW, {"betas": (0.9, 0.95)})


def training_step(model, optimizer, batches: list[torch.Tensor]):
    """A closure running one step on the next batch of `batches` (cycling)."""
    position = [0]

    def step():
        ids = batches[position[0] % len(batches)]
        position[0] += 1
        model.train()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument(
        "--table-gib", type=float, default=None,
        help="size of the disk table in GiB (default: 2.1x the machine's RAM)",
    )
    parser.add_argument(
        "--baseline-rows", type=int, default=1_000_003, help="rows per head of the in-RAM baseline (default: 1,000,003)"
    )
    parser.add_argument(
        "--offload-dir", default="outputs/tables_beyond_memory",
        help="folder for the disk table's working copy, deleted at the end (default: outputs/tables_beyond_memory)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each variant (default: 5)")
    args = parser.parse_args()
    machine, started = start_run(args)
    ram = machine_ram_bytes()
    machine += f", {ram / 2**30:.1f} GiB RAM"
    table_bytes = (args.table_gib * 2**30) if args.table_gib else 2.1 * ram

    from modeling_memory.tools.offline_checkpoints import load_smollm2

    base, tokenizer = load_smollm2()
    width = 16 * max(8, min(64, base.config.hidden_size // 16)) // HEADS_PER_LAYER  # the preset's per-head width
    layers = 2
    disk_rows = int(table_bytes // (layers * HEADS_PER_LAYER * width * 4))
    print(f"RAM {ram / 2**30:.1f} GiB; disk table: {disk_rows:,} rows per head ({table_bytes / 2**30:.1f} GiB)", flush=True)

    baseline = graft(base, tokenizer, args.baseline_rows, None)
    os.makedirs(args.offload_dir, exist_ok=True)
    try:
        begin = time.perf_counter()
        on_disk = graft(base, tokenizer, disk_rows, args.offload_dir)
        build_seconds = time.perf_counter() - begin
        del base
        sizes = {"in RAM": table_gib(baseline), "on disk": table_gib(on_disk)}
        print(f"built the disk table ({sizes['on disk']:.1f} GiB) in {build_seconds:.0f} s", flush=True)
        models = {"in RAM": baseline, "on disk": on_disk}

        prompt = text_batches(tokenizer, 1, 1, PROMPT_TOKENS)[0]
        dropped = drop_page_cache()
        cold = {}
        for name, model in models.items():
            begin = time.perf_counter()
            generate_once(model, prompt, tokenizer)()
            cold[name] = time.perf_counter() - begin
        print(f"first generate (page cache dropped: {dropped}): {cold}", flush=True)

        functions = {}
        for name, model in models.items():
            functions[f"{name} prefill"] = prefill_once(model, prompt)
            functions[f"{name} generate"] = generate_once(model, prompt, tokenizer)
        medians = interleaved_medians(functions, args.repeats)
        decode = {
            name: NEW_TOKENS / max(medians[f"{name} generate"] - medians[f"{name} prefill"], 1e-9) for name in models
        }
        print(f"decode tokens/s: {decode}", flush=True)

        batches = text_batches(tokenizer, 4, BATCH, SEQ_LEN)
        steps = {}
        for name, model in models.items():
            steps[name] = training_step(model, training_setup(model), batches)
        cold_step = {}
        for name in models:  # the first batch: rows never read before
            begin = time.perf_counter()
            steps[name]()
            cold_step[name] = time.perf_counter() - begin
        warm_step = interleaved_medians({name: steps[name] for name in models}, args.repeats)
        print(f"training step, first: {cold_step}; warm: {warm_step}", flush=True)
    finally:
        shutil.rmtree(args.offload_dir, ignore_errors=True)

    decode_ratio = decode["on disk"] / decode["in RAM"]
    step_ratio = warm_step["on disk"] / warm_step["in RAM"]
    rows = [
        ["Engram tables (2 layers x 16 heads)", f"{sizes['in RAM']:.2f} GiB", f"{sizes['on disk']:.1f} GiB", ""],
        ["table / machine RAM", f"{sizes['in RAM'] * 2**30 / ram:.2f}x", f"{sizes['on disk'] * 2**30 / ram:.2f}x", ""],
        ["building the table", "", f"{build_seconds:.0f} s", ""],
        ["first generate (cold rows)", f"{cold['in RAM']:.2f} s", f"{cold['on disk']:.2f} s", f"{cold['on disk'] / cold['in RAM']:.2f}x"],
        ["decode, warm page cache", f"{decode['in RAM']:.1f} tokens/s", f"{decode['on disk']:.1f} tokens/s", f"{decode_ratio:.2f}x (target >= 0.9x)"],
        ["first training step (cold rows)", f"{cold_step['in RAM']:.2f} s", f"{cold_step['on disk']:.2f} s", f"{cold_step['on disk'] / cold_step['in RAM']:.2f}x"],
        ["training step, rows read before", f"{warm_step['in RAM']:.2f} s", f"{warm_step['on disk']:.2f} s", f"{step_ratio:.2f}x (target <= 1.5x)"],
    ]
    table = markdown_table(["", "table in RAM", "table on disk", "disk / RAM"], rows)
    body = (
        f"SmolLM2-135M with the Engram preset (layers 2 and 15, 16 heads of width {width}), fp32. The disk table is "
        "grafted with `memory_placement=\"disk\"` (created in its working copy, never whole in RAM); the baseline's "
        f"table lives in RAM. Generation: a {PROMPT_TOKENS}-token prompt of real text, {NEW_TOKENS} new tokens, greedy; "
        f"decode = (generate - prefill) time. Training: batch {BATCH} x {SEQ_LEN} tokens of real text, tables on "
        "RowWiseAdagrad, the rest on AdamW; warm steps cycle over 4 batches. Page cache dropped before the first "
        f"generate: {'yes' if dropped else 'no (not permitted here)'}. Interleaved medians of {args.repeats} runs.\n\n"
        + table
    )
    print(table)
    finish_run(args, "Tables larger than memory (Engram on disk)", body, machine, started)


if __name__ == "__main__":
    main()
