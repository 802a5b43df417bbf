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


def _add_graft(subparsers):
    parser = subparsers.add_parser(
        "graft",
        help="graft memory onto a Llama-family checkpoint; OUT computes what BASE computes until trained",
        description="Graft memory onto BASE and write a MemoryLlama checkpoint to OUT, verified against BASE.",
    )
    parser.add_argument("base", help="a Hugging Face checkpoint directory, a .gguf file, or a Hub id")
    parser.add_argument("out", help="output directory (written through a temporary directory beside it)")
    parser.add_argument("--preset", default="both", help="engram, chapters or both (default), sized for the base")
    parser.add_argument("--memory-config", metavar="FILE", help="JSON object of memory fields, applied over the preset")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
        help="a memory field, applied last; VALUE is read as JSON when it parses (e.g. --set engram_layers=[1,5])",
    )
    parser.add_argument("--dtype", default="auto", help="auto (the base's; float32 for GGUF), float32, bfloat16, float16")
    parser.add_argument("--tokenizer", help="tokenizer to use instead of the one shipped with BASE")
    parser.add_argument("--revision", help="Hub revision when BASE is a Hub id")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest |logit difference| accepted (default 1e-4)")
    parser.add_argument("--allow-pickle", action="store_true", help="accept pickle-only weights (pytorch_model.bin)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (new parameters, bytes, layers); write nothing")
    parser.set_defaults(func=cmd_graft)


def cmd_graft(args) -> int:
    from .graft_checkpoint import GraftError, graft_checkpoint, sigterm_raises_keyboard_interrupt

    try:
        with sigterm_raises_keyboard_interrupt():
            graft_checkpoint(
                args.base,
                args.out,
                preset=args.preset,
                memory_json=args.memory_config,
                overrides=args.overrides,
                dtype=args.dtype,
                tokenizer=args.tokenizer,
                allow_pickle=args.allow_pickle,
                overwrite=args.overwrite,
                dry_run=args.dry_run,
                max_shard_size=args.max_shard_size,
                tolerance=args.tolerance,
                revision=args.revision,
            )
    except GraftError as error:
        raise SystemExit(f"memory-llama graft: error: {error}") from error
    return 0


def _add_export(subparsers):
    parser = subparsers.add_parser(
        "export", help="write a Hub-ready copy that loads with trust_remote_code=True without this package"
    )
    parser.add_argument("checkpoint", help="a MemoryLlama checkpoint directory (or Hub id when online)")
    parser.add_argument("out", help="output directory (written through a temporary directory beside it)")
    parser.add_argument("--repo-id", help="the Hub id the model card's loading snippets name (default: OUT's name)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    parser.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from .graft_checkpoint import GraftError, sigterm_raises_keyboard_interrupt
    from .hub_export import export_for_hub

    try:
        with sigterm_raises_keyboard_interrupt():
            result = export_for_hub(
                args.checkpoint, args.out, overwrite=args.overwrite, max_shard_size=args.max_shard_size, model_id=args.repo_id
            )
    except GraftError as error:  # ExportError included
        raise SystemExit(f"memory-llama export: error: {error}") from error
    print(f"loads without the package: max |logit difference| {result.max_abs_logit_diff:.3g}")
    print(f"wrote {result.out}: {', '.join(result.files)}")
    return 0


def _add_push(subparsers):
    parser = subparsers.add_parser(
        "push", help="export a checkpoint (as `export` does) and upload it to the Hugging Face Hub"
    )
    parser.add_argument("checkpoint", help="a MemoryLlama checkpoint directory")
    parser.add_argument("repo_id", help="Hub repository, e.g. your-name/my-memory-llama (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", help="branch to push to (created if missing)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit-message", help="commit message")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.set_defaults(func=cmd_push)


def cmd_push(args) -> int:
    from .graft_checkpoint import GraftError, sigterm_raises_keyboard_interrupt
    from .hub_export import push_checkpoint

    try:
        with sigterm_raises_keyboard_interrupt():
            commit = push_checkpoint(
                args.checkpoint,
                args.repo_id,
                commit_message=args.commit_message,
                private=True if args.private else None,
                revision=args.revision,
                create_pr=args.create_pr,
                max_shard_size=args.max_shard_size,
            )
    except GraftError as error:  # ExportError included
        raise SystemExit(f"memory-llama push: error: {error}") from error
    print(f"pushed to {commit.commit_url}")
    if commit.pr_url:
        print(f"pull request: {commit.pr_url}")
    return 0


def _add_train(subparsers):
    from .training_cli import add_train_arguments

    parser = subparsers.add_parser(
        "train",
        help="fine-tune with MemoryTrainer (modes: full, memory_only, lora, lora_all); TrainingArguments pass through",
        allow_abbrev=False,  # TrainingArguments has ~200 options: no prefix guessing
    )
    add_train_arguments(parser)
    parser.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from .training_cli import run_train

    return run_train(args)


def _add_eval(subparsers):
    from .training_cli import add_eval_arguments

    parser = subparsers.add_parser("eval", help="perplexity on text and exact-match recall on knowledge probes")
    add_eval_arguments(parser)
    parser.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from .training_cli import run_eval

    return run_eval(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memory-llama",
        description="MemoryLlama: Llama with learnt memory (chapter memory and Engram).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_info, _add_generate, _add_graft, _add_export, _add_push, _add_train, _add_eval):
        add(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
