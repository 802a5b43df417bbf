"""Canonical token ids for Engram: a surjective map raw id -> canonical id built from a tokenizer, so
that tokens differing only in case, accents, Unicode form or whitespace runs share n-gram rows.

Built once when memory is grafted and stored in the checkpoint as an int64 buffer, so no tokenizer
is needed at run time.
"""

import re
import unicodedata

import torch

_WHITESPACE_RUN = re.compile(r"\s+")


def normalize_token_text(text: str) -> str:
    """NFKC -> NFD -> strip accents -> lowercase -> collapse whitespace runs to one space."""
    text = unicodedata.normalize("NFKC", text)
    text = unicodedata.normalize("NFD", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
    text = text.lower()
    if text and text.isspace():
        return " "
    return _WHITESPACE_RUN.sub(" ", text)


def build_canonical_map(tokenizer, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) int64 map from raw id to canonical id, numbered in first-seen order.

    A token that decodes to a partial UTF-8 sequence (byte-level pieces) keeps its raw token string as
    its key; ids the tokenizer does not know (embedding rows beyond it) each keep their own id.
    """
    keys: dict[object, int] = {}
    canonical = torch.empty(vocab_size, dtype=torch.int64)
    known = len(tokenizer)
    for token_id in range(vocab_size):
        if token_id < known:
            text = tokenizer.decode([token_id])
            key = ("raw", tokenizer.convert_ids_to_tokens(token_id)) if "\ufffd" in text else normalize_token_text(text)
        else:
            key = ("unknown", token_id)
        canonical[token_id] = keys.setdefault(key, len(keys))
    return canonical
