"""Training text through `datasets`: loading, tokenising and packing into fixed-length rows.

`load_text_dataset` reads local .txt / .json / .jsonl / .parquet files (one file, or a folder of
them) with datasets' builders, or a Hub dataset name when online. `knowledge_dataset` turns the
built-in `KnowledgeSet` into a text dataset.

`pack_documents` is the one token packer (the command line, the demo and the benchmarks use it): every
document ends with EOS (Engram's n-gram history and the loss see the boundary), documents are
concatenated and the stream is cut into rows of `block_size` tokens; or each document starts a row of
its own. `tokenize_and_pack` runs it over a dataset: the last, shorter row of each map batch is padded
(attention_mask 0, label -100) rather than dropped, so no document is lost: a small knowledge set fits
in a few rows. With `separate_documents=True` the rows also carry `position_ids` that restart after each
EOS (`document_position_ids`): the model then keeps attention and memory inside each document
(`MemoryLlamaModel.packed_documents`), so short documents packed together train as they would alone.
"""

import os

import datasets

from modeling_memory.data.knowledge import KnowledgeSet

# File extension -> datasets builder.
BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
PACKING_BATCH_SIZE = 1000


def _local_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, name) for name in os.listdir(path)
            if os.path.splitext(name)[1].lower() in BUILDERS and not name.startswith(".")
        )
        if not files:
            raise ValueError(f"The folder {path} holds no {', '.join(BUILDERS)} files.")
        return files
    return [path]


def load_text_dataset(source: str, split: str = "train", text_column: str = "text") -> datasets.Dataset:
    """A `datasets.Dataset` with a string column `text_column`.

    `source`: a local file (.txt: one document per line; .json/.jsonl/.parquet: records with
    `text_column`), a folder of such files (one kind), or a Hub dataset name (needs network).
    """
    if os.path.exists(source):
        files = _local_files(source)
        extensions = {os.path.splitext(f)[1].lower() for f in files}
        unsupported = sorted(e for e in extensions if e not in BUILDERS)
        if unsupported:
            raise ValueError(
                f"Unsupported data file type {unsupported[0] or '(no extension)'} for {source}: use "
                f"{', '.join(BUILDERS)} files."
            )
        builders = {BUILDERS[e] for e in extensions}
        if len(builders) > 1:
            raise ValueError(f"{source} mixes file kinds ({sorted(extensions)}); keep one kind per folder.")
        builder = builders.pop()
        dataset = datasets.load_dataset(builder, data_files={"train": files}, split="train")
        if builder == "text":
            # The text builder names its column "text"; rename so that text_column holds the documents.
            if text_column != "text":
                dataset = dataset.rename_column("text", text_column)
            dataset = dataset.filter(lambda row: bool(row[text_column].strip()))  # blank lines are not documents
    else:
        looks_like_path = source.startswith((".", "/", "~")) or os.path.splitext(source)[1].lower() in BUILDERS
        if looks_like_path:
            raise FileNotFoundError(f"Data file or folder {source} does not exist.")
        if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
            raise ValueError(
                f"{source!r} is not a local path, and the Hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): "
                "pass a local .txt, .json, .jsonl or .parquet file or folder."
            )
        dataset = datasets.load_dataset(source, split=split)
    if text_column not in dataset.column_names:
        raise ValueError(
            f"{source} has no column {text_column!r} (columns: {dataset.column_names}); pass --text-column."
        )
    if not isinstance(dataset.features[text_column], datasets.Value) or dataset.features[text_column].dtype not in ("string", "large_string"):
        raise ValueError(f"Column {text_column!r} of {source} holds {dataset.features[text_column]}, not text.")
    if len(dataset) == 0:
        raise ValueError(f"{source} holds no documents.")
    return dataset


def knowledge_dataset(knowledge: KnowledgeSet) -> datasets.Dataset:
    """The knowledge set's training text: one document (a short biography) per fictional person."""
    return datasets.Dataset.from_dict({"text": knowledge.training_documents()})


def pad_id_of(tokenizer) -> int:
    """The id that fills padding: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pack_documents(
    documents,
    block_size: int,
    eos_id: int,
    pad_id: int,
    *,
    row_per_document: bool = False,
    drop_partial: bool = False,
    max_rows: int | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Token-id documents packed into rows of exactly `block_size` ids; returns (rows, attention masks).

    Each document (a list of ids, without EOS) is followed by `eos_id`. Documents are concatenated and the
    stream cut into rows, or with `row_per_document` each document starts a row of its own (a long one
    fills several). A shorter last row (of the stream, or of each document) is filled with `pad_id`, mask 0,
    or dropped with `drop_partial`. `documents` is read lazily: with `max_rows` it stops once that many
    rows are full.
    """
    if not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}.")
    rows, masks, stream = [], [], []

    def cut(final: bool) -> None:
        while len(stream) >= block_size or (final and stream):
            chunk = stream[:block_size]
            del stream[:block_size]
            if len(chunk) < block_size and drop_partial:
                continue
            missing = block_size - len(chunk)
            rows.append(chunk + [pad_id] * missing)
            masks.append([1] * len(chunk) + [0] * missing)

    for ids in documents:
        stream.extend(ids)
        stream.append(eos_id)
        cut(final=row_per_document)
        if max_rows is not None and len(rows) >= max_rows:
            return rows[:max_rows], masks[:max_rows]
    cut(final=True)
    return rows[:max_rows], masks[:max_rows]


def document_position_ids(row: list[int], eos_id: int) -> list[int]:
    """Position ids of a packed row that restart at 0 after every EOS: the packed-sequence convention of
    transformers (`DataCollatorWithFlattening`), which tells the model where each document starts. A document
    continued from the previous row starts at 0 too (rotary attention depends on relative positions only)."""
    positions, position = [], 0
    for token in row:
        positions.append(position)
        position = 0 if token == eos_id else position + 1
    return positions


def tokenize_and_pack(
    dataset: datasets.Dataset,
    tokenizer,
    block_size: int,
    text_column: str = "text",
    num_proc: int | None = None,
    separate_documents: bool = False,
) -> datasets.Dataset:
    """Rows of exactly `block_size` tokens: `input_ids`, `attention_mask`, `labels` (-100 at padding), and with
    `separate_documents` `position_ids` restarting at each document (`document_position_ids`), so that no
    token attends to, or is remembered with, the documents packed before it.

    Each document is tokenised without special tokens and followed by EOS; documents are packed
    back to back in dataset order (deterministic; `pack_documents` per map batch)."""
    if not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}.")
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no EOS token, which packing needs to mark document ends; set tokenizer.eos_token.")
    if text_column not in dataset.column_names:
        raise ValueError(f"The dataset has no column {text_column!r} (columns: {dataset.column_names}).")
    eos, pad = tokenizer.eos_token_id, pad_id_of(tokenizer)

    def pack(batch):
        documents = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        rows, masks = pack_documents(documents, block_size, eos, pad)
        labels = [[t if m else -100 for t, m in zip(row, mask)] for row, mask in zip(rows, masks)]
        packed = {"input_ids": rows, "attention_mask": masks, "labels": labels}
        if separate_documents:
            packed["position_ids"] = [document_position_ids(row, eos) for row in rows]
        return packed

    return dataset.map(
        pack,
        batched=True,
        batch_size=PACKING_BATCH_SIZE,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        desc=f"Tokenising and packing into rows of {block_size}",
    )


__all__ = [
    "BUILDERS",
    "document_position_ids",
    "knowledge_dataset",
    "load_text_dataset",
    "pack_documents",
    "pad_id_of",
    "tokenize_and_pack",
]
