"""Model cards for MemoryLlama checkpoints: the Jinja template in the top-level `model_cards/` folder,
filled with the memory layout, parameter counts and loading instructions, and rendered through
huggingface_hub's `ModelCard.from_template` (YAML metadata from `ModelCardData`).

The template ships with the package: pyproject.toml installs `model_cards/` as the package data
`modeling_memory/tools/model_cards/`; a source checkout reads the top-level folder directly.
"""

import importlib.util
from pathlib import Path

import jinja2
import jinja2.meta
from huggingface_hub import ModelCard, ModelCardData

from modeling_memory.tools.graft import MEMORY_FIELDS
from modeling_memory.tools.summary import memory_layout, parameter_counts
from modeling_memory.training.trainer import CHAPTER_BANK_LR_MULTIPLIER, ENGRAM_LR_MULTIPLIER, PKM_VALUES_LR_MULTIPLIER

TEMPLATE_NAME = "memory_llama.md"
BASE_NAME_KEY = "base_model_name"  # custom card metadata: the base's name when it is not a Hub id
TAGS = ("memory-llama", "engram", "chapter-memory")


def template_path(name: str = TEMPLATE_NAME) -> Path:
    """The template file: installed package data first, then the source tree's `model_cards/`."""
    candidates = []
    spec = importlib.util.find_spec("modeling_memory.tools.model_cards")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(location) / name for location in spec.submodule_search_locations]
    candidates.append(Path(__file__).resolve().parents[2] / "model_cards" / name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Model-card template {name!r} not found (looked in {', '.join(str(c.parent) for c in candidates)}); "
        "reinstall the package (`pip install -e .`) so its package data is in place."
    )


def read_base_info(checkpoint_dir) -> tuple[str | None, str | None, str | None]:
    """(base name, base Hub id, license) from the card of a checkpoint this package wrote, when it has one."""
    readme = Path(checkpoint_dir) / "README.md"
    if not readme.is_file():
        return None, None, None
    data = ModelCard.load(readme).data
    hub_id = data.base_model if isinstance(data.base_model, str) else None
    return data.get(BASE_NAME_KEY) or hub_id, hub_id, data.license


def _format_count(value: int) -> str:
    return f"{value:,}"


def render_model_card(
    model,
    *,
    model_id: str,
    base_name: str | None,
    base_hub_id: str | None = None,
    remote_code: bool,
    verification: str | None = None,
    license: str | None = None,
    tags=(),
) -> ModelCard:
    """The card of a MemoryLlama checkpoint.

    Args:
        model: the MemoryLlamaForCausalLM (its config, parameters and canonical-id map are described).
        model_id: what the loading snippets pass to `from_pretrained` (a Hub id or a folder name).
        base_name: the base model as shown to readers (a Hub id, or a directory / file name).
        base_hub_id: the base's Hub id, recorded as `base_model` metadata; None for local bases.
        remote_code: whether the folder carries the modeling code (`auto_map`, loads with trust_remote_code).
        verification: one line on how the checkpoint was checked, or None.
        license: the base's license identifier, when known.
        tags: extra Hub tags.
    """
    from modeling_memory import __version__

    config = model.config
    template = template_path()
    source = template.read_text(encoding="utf-8")
    counts = parameter_counts(model)
    canonical_summary = None
    if config.engram_layers:
        distinct = int(model.model.engram_canonical_map.unique().numel())
        canonical_summary = (
            f"{distinct:,} distinct of {config.vocab_size:,} token ids "
            f"(the tokenizer-derived map merges {1 - distinct / config.vocab_size:.1%} of them)"
        )
    all_tags = [*TAGS, *(["custom_code"] if remote_code else []), *tags]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=base_hub_id,
        license=license,
        tags=list(dict.fromkeys(all_tags)),
        **({BASE_NAME_KEY: base_name} if base_name and base_name != base_hub_id else {}),
    )
    values = dict(
        model_name=Path(model_id).name or model_id,
        model_id=model_id,
        base_name=base_name or "a Llama-family model",
        verification=verification,
        memory_layout=memory_layout(config),
        parameter_counts=[(k.replace("_", " "), _format_count(v)) for k, v in counts.items()],
        canonical_summary=canonical_summary,
        memory_fields=[(name, getattr(config, name)) for name in MEMORY_FIELDS],
        remote_code=remote_code,
        engram_lr_multiplier=ENGRAM_LR_MULTIPLIER,
        chapter_bank_lr_multiplier=CHAPTER_BANK_LR_MULTIPLIER,
        pkm_values_lr_multiplier=PKM_VALUES_LR_MULTIPLIER,
        package_version=__version__,
        dtype=str(model.dtype).removeprefix("torch."),
    )
    # Every variable the template names must be filled: a typo would otherwise render as empty text.
    needed = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(source)) - {"card_data"}
    missing = sorted(needed - set(values))
    if missing:
        raise KeyError(f"Model-card template {template} uses variables that are not provided: {missing}")
    return ModelCard.from_template(card_data, template_path=str(template), **values)


__all__ = ["read_base_info", "render_model_card", "template_path"]
