"""Forgetting: learn knowledge set A, then train on different data; how much of A is kept?

    python -m benchmarks.forgetting            # about 25 minutes on a 2-core CPU
    python -m benchmarks.forgetting --kinds baseline pkm pkm_smf   # product-key memory only (and the baseline)

The Mixture-of-Chapters paper reports that learnt memory forgets less under later training (ARC-C
falls 2.7 points vs 6.7 for dense under instruction tuning). Here, small models trained from scratch:

  phase 1: natural text mixed with knowledge set A (fictional people) until A is largely memorised;
  phase 2: the same number of steps on different data: natural text mixed with knowledge set B
           (other fictional people, same sentence patterns: the most interfering kind of new data).

Models: Llama baseline, + chapter memory, + Engram and chapter memory, + product-key memory (same
backbone, all parameters trained in both phases, same steps; not iso-FLOP: see benchmarks.iso_flop for that), and
the product-key model with sparse memory fine-tuning in phase 2 (after "Continual Learning via Sparse
Memory Finetuning", 2025): the same phase-1 model (shared, not retrained), then, on the same phase-2
data, only the top-t value rows that set B reads much more often than natural text does (TF-IDF of the
slot reads, `modeling_memory.training.sparse_memory_finetuning`) are trained, everything else frozen. `--kinds`
runs some of them only (the baseline always runs); such a run writes a RESULTS.md section of its own.
Reported over seeds (mean ± std): recall of A (training phrasings and held-out probes) after phase 1 and
after phase 2, retention = after / before, recall of B after phase 2, and validation loss on natural text.
Scaled down for a shared 2-core CPU: hidden 64, 2 layers, 2,048-token vocabulary, batch 8 x 64.
"""

from __future__ import annotations

import copy
import random
import statistics
import time

import torch

from benchmarks import from_scratch
from benchmarks.harness import benchmark_parser, finish_run, markdown_table, start_run
from modeling_memory.data.knowledge import KnowledgeSet
from modeling_memory.tools.evaluation import mean_token_nll
from modeling_memory.training.sparse_memory_finetuning import select_and_prepare

LABELS = {
    "baseline": "Llama baseline", "chapters": "+ chapter memory", "both": "+ Engram + chapter memory",
    "pkm": "+ product-key memory", "pkm_smf": "+ product-key memory, sparse memory fine-tuning in phase 2",
}
# The small_model each kind trains; kinds of one model share its phase 1 (per seed).
MODEL_OF = {"pkm_smf": "pkm"}
# Sparse memory fine-tuning's defaults, chosen in a quick check on seed 0 (SMF_CHOICE says how).
SMF_TOP_T = 128
SMF_LR = 0.01  # the values train at 10x (pkm_values_lr_multiplier): 0.1
SMF_CHOICE = (
    "Chosen on seed 0 (with the values then at lr x 1 and the gate and output at initializer_range; the same "
    "values learning rate, 0.1, is kept): top-t 128 is 1/8 of the table and about a fifth of the ~690 slots set B "
    "reads (24 % of B's read weight). At a values learning rate of 3e-3 to 1e-2 the selected rows changed nothing "
    "measurable; 0.1 is the smallest tried at which set B's loss falls clearly (mean NLL on B's training rows "
    "4.51 -> 3.94; full training: 0.82). Larger (0.3-3) or more rows (256-1024) brought B's loss only to 3.2-3.7 "
    "while set A's recall fell, and set B's recall stayed at about 0 in every setting tried"
)
# Natural-text rows whose slot reads are the background of the ranking (each row counts as one document).
BACKGROUND_ROWS = 256


def select_memory_slots(model, rows_b, mask_b, text_rows, top_t: int) -> dict[str, torch.Tensor]:
    """Sparse memory fine-tuning's slots: the top-t value rows by TF-IDF of set B's reads (new data) against
    natural-text rows (background, one row per batch, so that a slot's document frequency counts rows), then
    `model` frozen but for those rows."""
    new_data = [{"input_ids": rows_b[i : i + 1], "attention_mask": mask_b[i : i + 1]} for i in range(rows_b.shape[0])]
    spacing = max(1, text_rows.shape[0] // BACKGROUND_ROWS)
    background = [{"input_ids": row[None]} for row in text_rows[::spacing][:BACKGROUND_ROWS]]
    return select_and_prepare(model, new_data, background, top_t)


def check_only_selected_rows_changed(before: dict[str, torch.Tensor], model, selected: dict[str, torch.Tensor]) -> None:
    """Raise unless sparse memory fine-tuning changed nothing but the selected rows of the selected tables."""
    for name, param in model.named_parameters():
        changed = (param.detach() != before[name]).flatten(1).any(dim=1) if param.dim() > 1 else (param.detach() != before[name])
        allowed = torch.zeros_like(changed)
        if name in selected:
            allowed[selected[name]] = True
        if (changed & ~allowed).any():
            raise RuntimeError(f"sparse memory fine-tuning changed {int((changed & ~allowed).sum())} rows of {name} outside its selection")


def main() -> None:
    parser = benchmark_parser(__doc__, default_threads=1)  # one thread is fastest for these tiny models
    from_scratch.add_small_model_arguments(parser, entities=10)
    parser.add_argument("--steps", type=int, default=120, help="steps of each phase")
    parser.add_argument("--smf-top-t", type=int, default=SMF_TOP_T, help="sparse memory fine-tuning: value rows trained")
    parser.add_argument("--smf-lr", type=float, default=SMF_LR, help="sparse memory fine-tuning: learning rate of those rows")
    from_scratch.add_kinds_argument(parser, LABELS)
    args = parser.parse_args()
    machine, started = start_run(args)

    set_a = KnowledgeSet.generate(num_entities=args.entities, seed=0)
    set_b = KnowledgeSet.generate(num_entities=args.entities, seed=1)
    knowledge_documents = set_a.training_documents() + set_b.training_documents()
    vocabulary, train_blocks, validation_blocks = from_scratch.small_text_data(args, knowledge_documents)
    rows_a = vocabulary.document_blocks(set_a.training_documents(), args.block_size)
    rows_b, mask_b = vocabulary.document_blocks(set_b.training_documents(), args.block_size, with_mask=True)

    def recall(model, knowledge):
        return (
            from_scratch.reduced_probe_recall(model, vocabulary, knowledge.probes(held_out=False)),
            from_scratch.reduced_probe_recall(model, vocabulary, knowledge.probes(held_out=True)),
        )

    kinds = from_scratch.chosen_kinds(args, LABELS)
    keys = ("a_mem_1", "a_held_1", "loss_1", "a_mem_2", "a_held_2", "b_mem_2", "loss_2", "retention")
    results = {kind: {key: [] for key in keys} for kind in kinds}
    smf_rows = []  # value rows sparse memory fine-tuning trained, per seed
    for seed in range(args.seeds):
        phase_one = {}  # model kind -> (model after phase 1, data order state, A recall, validation loss)
        for kind in kinds:
            model_kind = MODEL_OF.get(kind, kind)
            start = time.perf_counter()
            if model_kind not in phase_one:
                model = from_scratch.small_model(args, vocabulary.size, model_kind, seed)
                rng = random.Random(seed)
                batches = from_scratch.mixed_batches(rng, train_blocks, rows_a, args.batch, args.knowledge_rows)
                from_scratch.train(model, batches, args.steps, args.lr, warmup_steps=20)
                phase_one[model_kind] = (model, rng.getstate(), recall(model, set_a), mean_token_nll(model, validation_blocks))
            trained, data_order, (a_mem, a_held), loss_1 = phase_one[model_kind]
            model, rng = copy.deepcopy(trained), random.Random()
            rng.setstate(data_order)
            r = results[kind]
            r["a_mem_1"].append(a_mem), r["a_held_1"].append(a_held), r["loss_1"].append(loss_1)
            lr, trainable = args.lr, None
            if kind == "pkm_smf":
                selected = select_memory_slots(model, rows_b, mask_b, train_blocks, args.smf_top_t)
                smf_rows.append(sum(rows.numel() for rows in selected.values()))
                lr, trainable = args.smf_lr, selected.__contains__
                before = {name: param.detach().clone() for name, param in model.named_parameters()}
            batches = from_scratch.mixed_batches(rng, train_blocks, rows_b, args.batch, args.knowledge_rows)
            from_scratch.train(model, batches, args.steps, lr, warmup_steps=20, trainable=trainable)
            if kind == "pkm_smf":
                check_only_selected_rows_changed(before, model, selected)
            a_mem2, a_held2 = recall(model, set_a)
            r["a_mem_2"].append(a_mem2), r["a_held_2"].append(a_held2)
            r["b_mem_2"].append(recall(model, set_b)[0])
            r["loss_2"].append(mean_token_nll(model, validation_blocks))
            r["retention"].append(a_mem2 / a_mem if a_mem > 0 else float("nan"))
            print(
                f"  seed {seed} {LABELS[kind]:<26} A after phase 1 {a_mem:.1%} (held-out {a_held:.1%}); "
                f"after phase 2 {a_mem2:.1%} (held-out {a_held2:.1%}); B {r['b_mem_2'][-1]:.1%}  "
                f"({time.perf_counter() - start:.0f}s)", flush=True,
            )

    def pct(values):
        return from_scratch.mean_and_spread([100 * v for v in values])

    rows = []
    for kind in kinds:
        r = results[kind]
        retention = [v for v in r["retention"] if v == v]
        rows.append([
            LABELS[kind], pct(r["a_mem_1"]), pct(r["a_mem_2"]),
            from_scratch.mean_and_spread(retention) if retention else "n/a",
            f"{pct(r['a_held_1'])} → {pct(r['a_held_2'])}", pct(r["b_mem_2"]),
            f"{statistics.mean(r['loss_1']):.3f} → {statistics.mean(r['loss_2']):.3f}",
        ])
    table = markdown_table(
        ["model", "A recall after phase 1 %", "A recall after phase 2 %", "retention of A",
         "A held-out probes % (1 → 2)", "B recall after phase 2 %", "validation loss (1 → 2)"],
        rows,
    )
    print(table)
    smf = ""
    if "pkm_smf" in kinds:
        smf = (
            f"\n\nSparse memory fine-tuning: the phase-1 model of '+ product-key memory' (the same one), then in "
            f"phase 2, on the same data, only the top {args.smf_top_t} value rows by TF-IDF of set B's reads against "
            f"{BACKGROUND_ROWS} natural-text rows ({', '.join(map(str, smf_rows))} rows per seed) train, at lr "
            f"{args.smf_lr:g} x 10 (the values' multiplier) on LazyAdam (touched rows only), everything else frozen; checked after phase 2: no "
            f"other weight changed."
        )
        if (args.smf_top_t, args.smf_lr) == (SMF_TOP_T, SMF_LR):
            smf += f" {SMF_CHOICE}."
    description = (
        f"Phase 1: {args.steps} steps on natural text ('{args.dataset}') with knowledge set A ({args.entities} "
        f"fictional people, {len(set_a.probes())} facts) in {args.knowledge_rows} of {args.batch} rows per batch; "
        f"phase 2: {args.steps} steps with knowledge set B (other people, same sentence patterns) instead. "
        f"All parameters trained in both phases{' (but see sparse memory fine-tuning below)' if smf else ''}; hidden {args.hidden}, {args.layers} layers, vocabulary "
        f"{vocabulary.size:,}, rows of {args.block_size} tokens; {args.seeds} seeds (mean ± std). Recall = exact "
        f"match of the greedy continuation of the training phrasing cut before the answer; retention = recall "
        f"after phase 2 / after phase 1 (per seed). {from_scratch.small_memory_description(args, kinds)}\n\n{table}{smf}"
    )
    title = from_scratch.results_title("Forgetting (benchmarks/forgetting.py)", kinds, LABELS)
    finish_run(args, title, description, machine, started)


if __name__ == "__main__":
    main()
