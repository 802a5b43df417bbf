"""The offline natural-text source: prose extraction, the deterministic split, the missing-package error."""

import pytest

from modeling_memory.data import natural_text
from modeling_memory.data.natural_text import load_natural_text, prose_paragraphs

RST = """\
Reading files
=============

The :func:`open` function returns a :term:`file object`, and is most commonly used with two
positional arguments and one keyword argument, as described in ``io``.

.. note::

   A directive body is not prose and is dropped.

For example::

   >>> f = open('workfile', 'w', encoding="utf-8")

See `the tutorial <https://docs.python.org/3/tutorial/>`_ for more about reading and writing text files.

Too short to keep.
"""


def test_prose_paragraphs_keep_prose_and_drop_markup():
    paragraphs = prose_paragraphs(RST)
    assert paragraphs == [
        "The open function returns a file object, and is most commonly used with two positional arguments "
        "and one keyword argument, as described in io.",
        "See the tutorial for more about reading and writing text files.",
    ]


def _write_docs(root, count: int) -> None:
    for i in range(count):
        page = root / "library" / f"module{i}.rst.txt"
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(f"Module number {i} is described here in a sentence with enough words to keep.\n")


def test_offline_split_is_deterministic_and_disjoint(tmp_path, monkeypatch):
    _write_docs(tmp_path, 60)
    monkeypatch.setenv(natural_text.PYTHON_DOCS_ENV, str(tmp_path))
    first = load_natural_text(validation_fraction=0.2)
    second = load_natural_text(validation_fraction=0.2)
    assert first["train"]["source"] == second["train"]["source"]
    assert first["validation"]["source"] == second["validation"]["source"]
    train, validation = set(first["train"]["source"]), set(first["validation"]["source"])
    assert not train & validation and len(train | validation) == 60
    assert 0 < len(validation) < 30
    assert first["train"][0]["text"].startswith("Module number")


def test_missing_source_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv(natural_text.PYTHON_DOCS_ENV, str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="apt-get install python3-doc"):
        load_natural_text()
