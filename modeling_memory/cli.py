"""`memory-llama`: the command line. Each subcommand is a function `cmd_<name>(args)`; `main` wires
them to argparse."""

import argparse
import sys


def _add_info(subparsers):
    parser = subparsers.add_parser("info", help="memory layout and parameter counts of a checkpoint")
    parser.add_argument("checkpoint", help="a MemoryLlama checkpoint directory (or Hub id when online)")
    parser.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from transformers import AutoConfig

    import modeling_memory  # noqa: F401  (registers memory_llama)

    from .summary import build_on_meta, memory_layout, parameter_counts

    config = AutoConfig.from_pretrained(args.checkpoint)
    if config.model_type != "memory_llama":
        raise SystemExit(
            f"{args.checkpoint} is a {config.model_type!r} checkpoint, not memory_llama; "
            "graft memory onto it first (MemoryLlamaForCausalLM.from_llama or `memory-llama graft`)."
        )
    print(memory_layout(config))
    counts = parameter_counts(build_on_meta(config))
    width = max(len(k) for k in counts)
    for key, value in counts.items():
        print(f"{key.replace('_', ' '):<{width}}  {value:>15,}")
    return 0


def _add_generate(subparsers):
    parser = subparsers.add_parser("generate", help="generate text from a checkpoint")
    parser.add_argument("checkpoint")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import modeling_memory  # noqa: F401

    if args.max_new_tokens < 1:
        raise SystemExit("--max-new-tokens must be >= 1.")
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    torch.manual_seed(args.seed)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    output = model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature if args.sample else None,
        num_beams=args.num_beams,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    print(tokenizer.decode(output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return 0


def _add_demo(subparsers):
    parser = subparsers.add_parser("demo", help="the main demo on the offline SmolLM2-135M checkpoint (no arguments)")
    parser.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memory-llama",
        description="MemoryLlama: Llama with learnt memory (chapter memory and Engram).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_info, _add_generate):
        add(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
