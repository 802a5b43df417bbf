"""Natural English text with a train/validation split, available offline.

The benchmarks and the demo measure language modelling on real prose (validation loss, perplexity)
on machines without network access. The default source is the English prose of the Python
documentation (the reStructuredText sources shipped by Debian's `python3-doc` package, PSF licence):
about 4,000 documents of modern technical English. Paragraphs of prose are kept; code blocks,
directives, tables and headings are dropped. Install it with:

    apt-get install python3-doc

Online users can name any Hub dataset instead (`load_natural_text("wikitext", config_name=
"wikitext-103-raw-v1")`), loaded with `datasets.load_dataset`.

The split is deterministic: a document goes to validation when the CRC32 of its path falls in the
first `validation_fraction` of the range, so the split never depends on file order or on the seed.
"""

from __future__ import annotations

import glob
import os
import re
import zlib
from pathlib import Path

PYTHON_DOCS = "python-docs"
PYTHON_DOCS_INSTALL = "apt-get install python3-doc"
# Debian installs the sources at /usr/share/doc/python3.X/html/_sources; override with this variable.
PYTHON_DOCS_ENV = "MODELING_MEMORY_PYTHON_DOCS"
_PYTHON_DOCS_GLOB = "/usr/share/doc/python3.*/html/_sources"

_ROLE = re.compile(r":[\w.+-]+(?::[\w.+-]+)*:`([^`]*)`")  # :func:`os.path.join` -> os.path.join
_LINK = re.compile(r"`([^`<]*?)\s*<[^>]*>`_{1,2}")  # `text <https://...>`_ -> text
_LITERAL = re.compile(r"``([^`]*)``")
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+<>_:.])\1{2,}\s*$")


def python_docs_root() -> Path:
    """The folder of the Python documentation's reStructuredText sources (newest Python version).

    Raises FileNotFoundError with the install command when the package is missing.
    """
    override = os.environ.get(PYTHON_DOCS_ENV)
    candidates = [override] if override else sorted(glob.glob(_PYTHON_DOCS_GLOB), key=_version_key)
    for candidate in reversed(candidates):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise FileNotFoundError(
        "The offline natural-text source is the Python documentation from Debian's python3-doc package "
        f"(looked for {override or _PYTHON_DOCS_GLOB}). Install it with `{PYTHON_DOCS_INSTALL}` (as root), "
        f"set {PYTHON_DOCS_ENV} to a folder of .rst.txt files, or name a Hub dataset instead (--dataset NAME)."
    )


def _version_key(path: str) -> tuple[int, ...]:
    match = re.search(r"python3\.(\d+)", path)
    return (int(match.group(1)),) if match else (0,)


def _clean_inline(text: str) -> str:
    text = _ROLE.sub(lambda m: m.group(1).split("<")[0].strip().lstrip("~!"), text)
    text = _LINK.sub(r"\1", text)
    text = _LITERAL.sub(r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def prose_paragraphs(rst: str, min_words: int = 8) -> list[str]:
    """The prose paragraphs of one reStructuredText document, inline markup reduced to plain text.

    Kept: blocks of unindented lines (list items included). Dropped: indented blocks (code, directive
    bodies, quotes), directives and comments (`..`), headings, tables, doctest lines, and short or
    mostly non-alphabetic blocks.
    """
    paragraphs = []
    for block in re.split(r"\n\s*\n", rst):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines or lines[0][:1].isspace():
            continue
        first = lines[0].lstrip()
        if first.startswith(("..", ">>>", "+-", "|", "=")) or any(_UNDERLINE.match(line) for line in lines):
            continue
        text = _clean_inline(" ".join(line.strip() for line in lines))
        if text.endswith("::"):
            text = text[:-1]  # "For example::" introduces a code block that is dropped
        letters = sum(ch.isalpha() or ch.isspace() for ch in text)
        if len(text.split()) < min_words or letters < 0.8 * len(text):
            continue
        paragraphs.append(text)
    return paragraphs


def python_docs_documents(min_words: int = 8) -> list[dict]:
    """Every documentation page with prose: [{"text": paragraphs joined by blank lines, "source": path}]."""
    root = python_docs_root()
    documents = []
    for path in sorted(root.rglob("*.rst.txt")):
        paragraphs = prose_paragraphs(path.read_text(encoding="utf-8", errors="replace"), min_words=min_words)
        if paragraphs:
            documents.append({"text": "\n\n".join(paragraphs), "source": str(path.relative_to(root))})
    return documents


def in_validation(key: str, validation_fraction: float) -> bool:
    """Deterministic split by a stable hash of the document's key."""
    return zlib.crc32(key.encode("utf-8")) % 10_000 < validation_fraction * 10_000


def load_natural_text(
    dataset: str = PYTHON_DOCS,
    config_name: str | None = None,
    text_column: str = "text",
    validation_fraction: float = 0.05,
):
    """Natural text as a `datasets.DatasetDict` with "train" and "validation" splits and a "text" column.

    Args:
        dataset: "python-docs" (offline, the default) or any name `datasets.load_dataset` accepts.
        config_name: the Hub dataset's configuration, e.g. "wikitext-103-raw-v1".
        text_column: the Hub dataset's text column (renamed to "text").
        validation_fraction: share of documents held out when the source has no validation split.
    """
    import datasets

    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be between 0 and 1, got {validation_fraction}.")
    if dataset == PYTHON_DOCS:
        documents = python_docs_documents()
        train = [d for d in documents if not in_validation(d["source"], validation_fraction)]
        validation = [d for d in documents if in_validation(d["source"], validation_fraction)]
        return datasets.DatasetDict(
            train=datasets.Dataset.from_list(train), validation=datasets.Dataset.from_list(validation)
        )

    loaded = datasets.load_dataset(dataset, config_name)
    if text_column != "text":
        loaded = loaded.rename_column(text_column, "text")
    loaded = loaded.filter(lambda row: bool(row["text"] and row["text"].strip()))
    if "validation" in loaded:
        return datasets.DatasetDict(train=loaded["train"], validation=loaded["validation"])
    split = loaded["train"].train_test_split(test_size=validation_fraction, seed=0)
    return datasets.DatasetDict(train=split["train"], validation=split["test"])


__all__ = ["PYTHON_DOCS", "load_natural_text", "prose_paragraphs", "python_docs_documents"]
