"""`memory-llama demo`: graft Engram and chapter memory onto the real SmolLM2-135M offline and show that
the grafted model computes exactly what the base model computes."""

import time

import torch

PROMPTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "def fibonacci(n):",
)


def run_demo(max_new_tokens: int = 24) -> int:
    from .grafting import memory_preset
    from .modeling_memory_llama import MemoryLlamaForCausalLM
    from .offline_checkpoints import load_smollm2
    from .summary import memory_layout, parameter_counts

    start = time.perf_counter()
    print("[1/3] loading SmolLM2-135M-Instruct (offline) ...", flush=True)
    base, tokenizer = load_smollm2()
    print(f"      {sum(p.numel() for p in base.parameters()):,} parameters, {time.perf_counter() - start:.1f}s")

    print("[2/3] grafting Engram and chapter memory ...", flush=True)
    memory = MemoryLlamaForCausalLM.from_llama(base, tokenizer=tokenizer, **memory_preset(base.config, "both"))
    print(memory_layout(memory.config))
    for key, value in parameter_counts(memory).items():
        print(f"      {key.replace('_', ' '):<18} {value:>13,}")
    canonical = memory.model.engram_canonical_map
    distinct = int(canonical.unique().numel())
    print(f"      canonical token ids: {distinct:,} of {canonical.numel():,} ({1 - distinct / canonical.numel():.1%} fewer)")

    print("[3/3] greedy generation, base vs grafted ...", flush=True)
    all_identical = True
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            logit_gap = (base(**inputs).logits - memory(**inputs).logits).abs().max().item()
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        base_ids = base.generate(**inputs, **kwargs)
        memory_ids = memory.generate(**inputs, **kwargs)
        identical = torch.equal(base_ids, memory_ids)
        all_identical &= identical
        text = tokenizer.decode(memory_ids[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        print(f"  {prompt!r} -> {text!r}")
        print(f"      max |logit difference| {logit_gap:.2e}; {max_new_tokens} greedy tokens identical: {identical}")
    print(f"done in {time.perf_counter() - start:.1f}s: grafted model {'==' if all_identical else '!='} base model")
    return 0 if all_identical else 1
