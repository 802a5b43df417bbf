"""A grafted associative memory on a real checkpoint: facts placed early in a long context, asked at its end.

    python -m benchmarks.graft_long_context            # about 20 minutes on a 2-core CPU
    python -m benchmarks.graft_long_context --steps 10 --seeds 1 --eval-prompts 8   # a quick look

SmolLM2-135M-Instruct (offline, from its GGUF) with the "mosaic" graft preset: a long-term associative memory
(Memory Mosaics v2) beside the self-attention of layers 20 and 25, its output projection zero at birth, reading
the pairs at least 64 tokens back. Trained briefly on long documents of a synthetic multi-document task private
to this benchmark, only the associative memory trained (the base stays frozen, so what it knew is untouched).

The task: several short documents, each opening with one fact ("The access code of the Velmora archive is
4821.") followed by unrelated prose (the offline Python documentation), then a question about one document's
fact. Scored by ranking the candidate answers (the values of every fact in the context) by their likelihood:
chance is 1 / documents. Training and evaluation use different entities, values and prose.

Compared at equal steps on the same documents: the base as it is; the base with LoRA on its attention
projections (r = 8: about as many trained parameters as the memory) - the control that says whether the gain
comes from the memory or merely from training on the task's format; and the mosaic graft. Accuracy is reported
by the distance between the fact and the question (the first document's fact is the farthest), mean ± std over
seeds (seed: the new weights' initialisation and the training documents' order).
"""

from __future__ import annotations

import copy
import random
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model

from benchmarks import from_scratch
from benchmarks.harness import benchmark_parser, finish_run, markdown_table, start_run
from modeling_memory.data.natural_text import load_natural_text
from modeling_memory.tools.graft import graft, memory_config_from_llama
from modeling_memory.tools.offline_checkpoints import load_smollm2

LABELS = {"base": "base (SmolLM2-135M)", "lora": "base + LoRA (attention, r 8)", "mosaic": "+ associative memory"}
SYLLABLES = ["vel", "mor", "qua", "tis", "dran", "ob", "lek", "sun", "var", "eth", "pol", "ri", "zan", "cor", "mi"]


def entity_name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()


def prose_chunks(tokenizer, texts: list[str], tokens: int) -> list[list[int]]:
    """Unrelated prose cut into pieces of `tokens` token ids."""
    ids = []
    for text in texts:
        ids.extend(tokenizer(" " + " ".join(text.split()), add_special_tokens=False)["input_ids"])
    return [ids[i : i + tokens] for i in range(0, len(ids) - tokens, tokens)]


def task_sample(rng: random.Random, tokenizer, prose: list[list[int]], documents: int, asked: int | None = None):
    """(context + question token ids, the asked fact's value, every value in the context, the asked document)."""
    names, values = [], []
    while len(names) < documents:
        name = entity_name(rng)
        if name not in names:
            names.append(name)
            values.append(str(rng.randint(1000, 9999)))
    ids = []
    for index, (name, value) in enumerate(zip(names, values)):
        ids += tokenizer(f"Document {index + 1}. The access code of the {name} archive is {value}.", add_special_tokens=False)["input_ids"]
        ids += rng.choice(prose) + tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    asked = rng.randrange(documents) if asked is None else asked
    question = f"Question: what is the access code of the {names[asked]} archive? Answer: the access code is"
    ids += tokenizer(question, add_special_tokens=False)["input_ids"]
    return ids, values[asked], values, asked


@torch.no_grad()
def answer_is_ranked_first(model, tokenizer, prompt: list[int], answer: str, candidates: list[str]) -> bool:
    """Whether `answer` is the likeliest continuation among `candidates` (summed token log-probabilities). The
    prompt runs once; each candidate continues from a copy of its cache."""
    output = model(torch.tensor([prompt]), use_cache=True)
    scores = {}
    for candidate in candidates:
        continuation = tokenizer(" " + candidate, add_special_tokens=False)["input_ids"]
        logits = model(torch.tensor([continuation[:-1]]), cache=copy.deepcopy(output.cache), use_cache=True).logits
        log_probs = torch.cat([output.logits[0, -1:], logits[0]]).float().log_softmax(-1)
        scores[candidate] = float(log_probs.gather(-1, torch.tensor(continuation)[:, None]).sum())
    return max(scores, key=scores.get) == answer


def accuracy_by_document(model, tokenizer, samples, documents: int) -> list[float]:
    """Share of questions answered, per asked document (document 1's fact is the farthest from the question)."""
    right = [[] for _ in range(documents)]
    for prompt, answer, candidates, asked in samples:
        right[asked].append(answer_is_ranked_first(model, tokenizer, prompt, answer, candidates))
    return [sum(r) / len(r) for r in right]


def main() -> None:
    parser = benchmark_parser(__doc__, default_threads=1)  # steadiest on a machine shared with other work
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16, help="training steps (batch 1)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--documents", type=int, default=8, help="documents (facts) per context")
    parser.add_argument("--prose-tokens", type=int, default=96, help="prose tokens after each fact")
    parser.add_argument("--eval-prompts", type=int, default=2, help="questions per document in the evaluation")
    args = parser.parse_args()
    machine, started = start_run(args)

    base, tokenizer = load_smollm2()
    text = load_natural_text()
    train_prose = prose_chunks(tokenizer, text["train"]["text"][:400], args.prose_tokens)
    eval_prose = prose_chunks(tokenizer, text["validation"]["text"][:200], args.prose_tokens)
    eval_rng = random.Random(12345)
    samples = [
        task_sample(eval_rng, tokenizer, eval_prose, args.documents, asked)
        for asked in range(args.documents) for _ in range(args.eval_prompts)
    ]
    context = statistics.mean(len(sample[0]) for sample in samples)
    print(f"{len(samples)} questions, contexts of {context:.0f} tokens on average", flush=True)

    results = {kind: [] for kind in LABELS}
    results["base"].append(accuracy_by_document(base, tokenizer, samples, args.documents))
    print(f"base: {results['base'][0]}", flush=True)
    config = memory_config_from_llama(base.config, preset="mosaic")
    trained_params = {}
    for seed in range(args.seeds):
        for kind in ("lora", "mosaic"):
            start = time.perf_counter()
            torch.manual_seed(seed)
            if kind == "mosaic":
                model = graft(copy.deepcopy(base), config)
                trainable = lambda name: "associative_memory" in name  # noqa: E731
                trained_params["mosaic"] = sum(p.numel() for n, p in model.named_parameters() if trainable(n))
            else:
                lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
                model = get_peft_model(copy.deepcopy(base), lora)
                trainable = lambda name: "lora_" in name  # noqa: E731
            rng = random.Random(seed)
            batches = [torch.tensor([task_sample(rng, tokenizer, train_prose, args.documents)[0]]) for _ in range(args.steps)]
            from_scratch.train(model, lambda step: batches[step], args.steps, args.lr, warmup_steps=max(1, args.steps // 10), trainable=trainable)
            results[kind].append(accuracy_by_document(model, tokenizer, samples, args.documents))
            print(f"seed {seed} {kind}: {results[kind][-1]} ({time.perf_counter() - start:.0f} s)", flush=True)

    def cell(values: list[float]) -> str:
        mean = statistics.mean(values)
        spread = f" ± {statistics.stdev(values):.0%}" if len(values) > 1 else ""
        return f"{mean:.0%}{spread}"

    header = ["model"] + [f"document {d + 1}" for d in range(args.documents)] + ["all"]
    rows = []
    for kind, label in LABELS.items():
        per_seed = results[kind]
        row = [cell([run[d] for run in per_seed]) for d in range(args.documents)]
        rows.append([label] + row + [cell([statistics.mean(run) for run in per_seed])])
    table = markdown_table(header, rows)
    print(table)
    body = (
        f"{args.documents} documents of one fact + {args.prose_tokens} prose tokens, then the question: contexts of "
        f"{context:.0f} tokens on average, document 1's fact about {context - 30:.0f} tokens before the question. "
        f"{len(samples)} questions ({args.eval_prompts} per document), answers ranked among the "
        f"{args.documents} values in the context (chance {1 / args.documents:.0%}). Trained {args.steps} steps of "
        f"batch 1 at lr {args.lr} (AdamW, warm-up then cosine); the associative memory has "
        f"{trained_params['mosaic']:,} parameters; seeds: {args.seeds}.\n\n{table}\n"
    )
    finish_run(args, "Grafted associative memory, facts early in a long context (benchmarks/graft_long_context.py)", body, machine, started)


if __name__ == "__main__":
    main()
