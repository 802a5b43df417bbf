"""The commands of `memory-llama`: `cmd_<name>(args)` for each, with `args` as `memory_llama_cli.parser` builds
them (`memory_llama_cli.main` imports this module only to run a command). Bad input raises ToolError, which the
entry point prints as one line.

Every command that reads a model takes a checkpoint folder, a Hub id (`owner/name`) or an adapter folder
written by `memory-llama train` in a LoRA mode (loaded with the base model it names, or merged into it where a
plain checkpoint is needed: export, push, merge).
"""

import os
import sys

from modeling_memory.tools.errors import ToolError
from modeling_memory.tools.loading import adapter_base, check_gguf_file, looks_like_hub_id


# ---- checkpoints named on the command line -------------------------------------------------------


def checkpoint_kind(checkpoint: str) -> str:
    """What CHECKPOINT names: "folder" (a Hugging Face checkpoint folder), "adapter" (an adapter folder whose
    base is a local folder), "gguf" (a .gguf file) or "hub" (a Hub id, `owner/name`); anything else raises
    ToolError at once, saying what to pass instead."""
    path = os.path.expanduser(checkpoint)
    if os.path.isdir(path):
        if adapter_base(path) is not None:
            return "adapter"
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ToolError(f"{checkpoint} has no config.json, so it is not a checkpoint folder: pass the folder that "
                            "save_pretrained wrote (config.json and weights), or an adapter folder (adapter_config.json).")
        return "folder"
    if os.path.isfile(path):
        if not path.lower().endswith(".gguf"):
            raise ToolError(f"{checkpoint} is a file: pass the checkpoint folder holding it (config.json and weights), "
                            "or a .gguf file.")
        check_gguf_file(path, checkpoint)
        return "gguf"
    if not looks_like_hub_id(checkpoint):
        raise ToolError(f"{checkpoint}: no such file or folder. Pass a checkpoint folder, a .gguf file or a Hub id "
                        "(owner/name).")
    return "hub"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load_failure(checkpoint: str, kind: str, what: str, error: BaseException) -> ToolError:
    if kind == "hub":
        return ToolError(f"{checkpoint}: no such file or folder, and loading it as a Hub id failed: {_first_line(error)}")
    return ToolError(f"cannot load the {what} of {checkpoint}: {_first_line(error)}")


def _location(checkpoint: str, kind: str) -> tuple[str, dict]:
    """(name or folder, from_pretrained keyword arguments) of the config: a .gguf file loads from its folder with
    gguf_file=, an adapter's from its base."""
    if kind == "adapter":
        return adapter_base(os.path.expanduser(checkpoint)), {}
    if kind != "gguf":
        return checkpoint, {}
    path = os.path.abspath(os.path.expanduser(checkpoint))
    return os.path.dirname(path), {"gguf_file": os.path.basename(path)}


# ---- commands -----------------------------------------------------------------------------------


def cmd_info(args) -> int:
    kind = checkpoint_kind(args.checkpoint)
    from transformers import AutoConfig

    from modeling_memory.tools.summary import build_on_meta, memory_layout, parameter_counts

    location, gguf = _location(args.checkpoint, kind)
    try:
        config = AutoConfig.from_pretrained(location, **gguf)
    except (OSError, ValueError, KeyError) as error:
        raise _load_failure(args.checkpoint, kind, "config", error) from error
    if config.model_type != "memory_llama":
        what = "a GGUF file holding a plain" if kind == "gguf" else "a plain"
        raise ToolError(
            f"{args.checkpoint} is {what} {config.model_type!r} checkpoint ({config.num_hidden_layers} layers, hidden "
            f"size {config.hidden_size}) without memory: graft memory onto it first (`memory-llama graft "
            f"{args.checkpoint} OUT`, or modeling_memory.from_llama), then run `memory-llama info OUT`."
        )
    if kind == "adapter":
        print(_describe_adapter(args.checkpoint, location))
    print(memory_layout(config))
    counts = parameter_counts(build_on_meta(config))
    width = max(len(k) for k in counts)
    for key, value in counts.items():
        print(f"{key.replace('_', ' '):<{width}}  {value:>15,}")
    return 0


def _describe_adapter(adapter: str, base: str) -> str:
    """One line on an adapter folder: its LoRA settings, its base, whether memory was trained beside it."""
    import json

    from modeling_memory.training.peft_modes import MEMORY_WEIGHTS_NAME

    with open(os.path.join(os.path.expanduser(adapter), "adapter_config.json")) as handle:
        settings = json.load(handle)
    targets = settings.get("target_modules") or []
    memory = os.path.isfile(os.path.join(os.path.expanduser(adapter), MEMORY_WEIGHTS_NAME))
    return (f"adapter: {settings.get('peft_type', 'LoRA')} r={settings.get('r')} on {len(targets)} modules over the base "
            f"{base}{', with the memory trained beside it (' + MEMORY_WEIGHTS_NAME + ')' if memory else ''}; the base:")


def cmd_generate(args) -> int:
    if args.max_new_tokens < 1:
        raise ToolError("--max-new-tokens must be >= 1.")
    if args.num_beams < 1:
        raise ToolError("--num-beams must be >= 1.")
    if args.sample and not args.temperature > 0:
        raise ToolError("--temperature must be > 0 with --sample.")
    kind = checkpoint_kind(args.checkpoint)
    if kind == "gguf" and args.memory_placement is not None:
        raise ToolError(f"{args.checkpoint} is a GGUF file, which generates with its plain base model: it has no memory "
                        "tables to place. Drop --memory-placement, or graft memory first (`memory-llama graft`).")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from memory_llama_cli.train_command import placement_arguments
    from modeling_memory.tools.loading import from_pretrained, load_memory_llama

    location, gguf = _location(args.checkpoint, kind)
    placement = {}
    if args.memory_placement is not None:
        try:
            config = AutoConfig.from_pretrained(location)
        except (OSError, ValueError, KeyError) as error:
            raise _load_failure(args.checkpoint, kind, "config", error) from error
        if config.model_type != "memory_llama":
            raise ToolError(f"{args.checkpoint} is a plain {config.model_type!r} checkpoint without memory tables to "
                            "place: drop --memory-placement, or graft memory first (`memory-llama graft`).")
        placement = placement_arguments(args, config)
    if kind == "gguf":
        print(f"{args.checkpoint} is a GGUF file: generating with its plain base model (no memory).", file=sys.stderr)
    try:
        # An adapter folder written by `train` holds the tokenizer it trained with; else its base's.
        tokenizer = AutoTokenizer.from_pretrained(args.checkpoint if kind == "adapter" and _has_tokenizer(args.checkpoint)
                                                  else location, **gguf)
    except (OSError, ValueError, TypeError, KeyError) as error:
        hint = "" if kind == "hub" else "; save the tokenizer next to the model (tokenizer.save_pretrained)"
        raise ToolError(f"{_load_failure(args.checkpoint, kind, 'tokenizer', error)}{hint}") from error
    try:
        if kind == "adapter":
            model = load_memory_llama(args.checkpoint, allow_pickle=args.allow_pickle, dtype=torch.float32, **placement)
        else:
            model = from_pretrained(
                AutoModelForCausalLM, location, allow_pickle=args.allow_pickle, dtype=torch.float32, **gguf, **placement
            )
    except (OSError, ValueError, KeyError) as error:
        if isinstance(error, ToolError):
            raise
        raise _load_failure(args.checkpoint, kind, "model", error) from error
    model.eval()
    inputs = tokenizer(args.prompt, return_tensors="pt")
    if inputs["input_ids"].shape[1] == 0:
        raise ToolError("--prompt gives no tokens: pass some text.")
    torch.manual_seed(args.seed)
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


def _has_tokenizer(folder: str) -> bool:
    return os.path.isfile(os.path.join(os.path.expanduser(folder), "tokenizer_config.json"))


def cmd_demo(args) -> int:
    from modeling_memory.tools.demo import run_demo

    return run_demo()


def cmd_graft(args) -> int:
    from modeling_memory.tools.graft_to_folder import graft_checkpoint

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
    return 0


def _say_if_merging(checkpoint: str, kind: str) -> None:
    if kind == "adapter":
        print(f"{checkpoint} is an adapter folder: merging it into its base {_location(checkpoint, kind)[0]} first")


def cmd_export(args) -> int:
    kind = checkpoint_kind(args.checkpoint)
    _say_if_merging(args.checkpoint, kind)
    from modeling_memory.tools.export import export_for_hub

    result = export_for_hub(
        args.checkpoint, args.out, overwrite=args.overwrite, max_shard_size=args.max_shard_size, model_id=args.repo_id,
        allow_pickle=args.allow_pickle,
    )
    print(f"loads without the package: max |logit difference| {result.max_abs_logit_diff:.3g}")
    print(f"wrote {result.out}: {', '.join(result.files)}")
    return 0


def cmd_merge(args) -> int:
    from modeling_memory.tools.merge import merge_adapter

    result = merge_adapter(args.adapter, args.out, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
                           allow_pickle=args.allow_pickle)
    print(f"merged into {result.base}: max |logit difference| against the adapter model {result.max_abs_logit_diff:.3g}")
    print(f"wrote {result.out}: {', '.join(result.files)}")
    return 0


def cmd_push(args) -> int:
    kind = checkpoint_kind(args.checkpoint)
    _say_if_merging(args.checkpoint, kind)
    from modeling_memory.tools.export import push_checkpoint

    commit = push_checkpoint(
        args.checkpoint,
        args.repo_id,
        allow_pickle=args.allow_pickle,
        commit_message=args.commit_message,
        private=True if args.private else None,
        revision=args.revision,
        create_pr=args.create_pr,
        max_shard_size=args.max_shard_size,
    )
    print(f"pushed to {commit.commit_url}")
    if commit.pr_url:
        print(f"pull request: {commit.pr_url}")
    return 0


def cmd_train(args) -> int:
    from memory_llama_cli.train_command import parse_train_command_line, run_train

    return run_train(parse_train_command_line(args.command_line))


def cmd_eval(args) -> int:
    from memory_llama_cli.train_command import run_eval

    return run_eval(args)
