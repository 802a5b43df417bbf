"""Data loading and packing against plain-Python references, the knowledge set's guarantees, and
the local `evaluate` metric modules against independent implementations."""

import json
import math

import datasets
import pytest

from modeling_memory.data.packing import (
    document_position_ids,
    knowledge_dataset,
    load_text_dataset,
    pack_documents,
    tokenize_and_pack,
)
from modeling_memory.data.knowledge import ATTRIBUTES, KnowledgeSet, answer_recalled, general_knowledge_probes
from modeling_memory.tools.metrics import load_metric, metric_path
from training_helpers import tiny_tokenizer

DOCUMENTS = ["The first document.", "A second, longer document about Lisbon and 1953.", "Third."]


def _write_all_formats(tmp_path):
    (tmp_path / "docs.txt").write_text("\n".join(DOCUMENTS[:1] + [""] + DOCUMENTS[1:]) + "\n")  # a blank line is skipped
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCUMENTS)))
    (tmp_path / "docs.json").write_text(json.dumps([{"body": d} for d in DOCUMENTS]))
    datasets.Dataset.from_dict({"body": DOCUMENTS}).to_parquet(str(tmp_path / "docs.parquet"))


@pytest.mark.parametrize("name, column", [("docs.txt", "text"), ("docs.jsonl", "body"), ("docs.json", "body"), ("docs.parquet", "body")])
def test_load_local_files(tmp_path, name, column):
    _write_all_formats(tmp_path)
    dataset = load_text_dataset(str(tmp_path / name), text_column=column)
    assert dataset[column] == DOCUMENTS


def test_load_folder_and_text_column_rename(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "a.txt").write_text(DOCUMENTS[0] + "\n")
    (folder / "b.txt").write_text("\n".join(DOCUMENTS[1:]) + "\n")
    assert load_text_dataset(str(folder), text_column="content")["content"] == DOCUMENTS


def test_load_errors_say_what_is_wrong(tmp_path, monkeypatch):
    _write_all_formats(tmp_path)
    (tmp_path / "docs.csv").write_text("text\nhello\n")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_dataset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="Unsupported data file type .csv"):
        load_text_dataset(str(tmp_path / "docs.csv"))
    with pytest.raises(ValueError, match="no column 'text'.*pass --text-column"):
        load_text_dataset(str(tmp_path / "docs.jsonl"))
    with pytest.raises(ValueError, match="mixes file kinds"):
        load_text_dataset(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="Hub is switched off"):
        load_text_dataset("someone/some-dataset")


def test_packing_matches_a_plain_python_reference():
    tokenizer = tiny_tokenizer()
    dataset = datasets.Dataset.from_dict({"text": DOCUMENTS * 3})
    block = 16
    rows = tokenize_and_pack(dataset, tokenizer, block)

    stream = []
    for document in DOCUMENTS * 3:
        stream += tokenizer.encode(document, add_special_tokens=False) + [tokenizer.eos_token_id]
    expected = [stream[i : i + block] for i in range(0, len(stream), block)]
    assert len(rows) == len(expected)
    for row, chunk in zip(rows, expected):
        padding = block - len(chunk)
        assert row["input_ids"] == chunk + [tokenizer.pad_token_id] * padding
        assert row["attention_mask"] == [1] * len(chunk) + [0] * padding
        assert row["labels"] == chunk + [-100] * padding
    assert sum(sum(row["attention_mask"]) for row in rows) == len(stream)  # nothing dropped


def test_separate_documents_restart_positions_after_every_eos():
    assert document_position_ids([5, 6, 2, 7, 2, 2, 8, 9], eos_id=2) == [0, 1, 2, 0, 1, 0, 0, 1]
    tokenizer = tiny_tokenizer()
    dataset = datasets.Dataset.from_dict({"text": DOCUMENTS * 3})
    plain = tokenize_and_pack(dataset, tokenizer, 16)
    separate = tokenize_and_pack(dataset, tokenizer, 16, separate_documents=True)
    assert "position_ids" not in plain.column_names
    assert separate.remove_columns("position_ids").to_dict() == plain.to_dict()  # the rows themselves are the same
    for row in separate:
        position = 0
        for token, given in zip(row["input_ids"], row["position_ids"]):  # counted here from the EOS positions
            assert given == position
            position = 0 if token == tokenizer.eos_token_id else position + 1


def test_pack_documents_one_row_per_document_and_dropping_the_rest():
    documents = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]  # + EOS 2 each; pad 0
    assert pack_documents(documents, 4, eos_id=2, pad_id=0, row_per_document=True) == (
        [[5, 6, 7, 2], [8, 2, 0, 0], [9, 10, 11, 12], [13, 2, 0, 0]],
        [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]],
    )
    assert pack_documents(documents, 4, eos_id=2, pad_id=0, drop_partial=True)[0] == [[5, 6, 7, 2], [8, 2, 9, 10], [11, 12, 13, 2]]
    assert pack_documents(documents, 3, eos_id=2, pad_id=0, drop_partial=True, max_rows=2)[0] == [[5, 6, 7], [2, 8, 2]]
    consumed = []
    pack_documents((consumed.append(d) or d for d in documents), 3, eos_id=2, pad_id=0, max_rows=1)
    assert len(consumed) == 1  # stops reading once the rows are full


def test_packing_rejects_bad_settings():
    tokenizer = tiny_tokenizer()
    dataset = datasets.Dataset.from_dict({"text": DOCUMENTS})
    with pytest.raises(ValueError, match="block_size must be an integer >= 2"):
        tokenize_and_pack(dataset, tokenizer, 1)
    with pytest.raises(ValueError, match="no column 'body'"):
        tokenize_and_pack(dataset, tokenizer, 8, text_column="body")


def test_knowledge_set_is_deterministic_and_well_formed():
    first, again, other = KnowledgeSet.generate(30, seed=7), KnowledgeSet.generate(30, seed=7), KnowledgeSet.generate(30, seed=8)
    assert first.training_statements() == again.training_statements()
    assert [p.prompt for p in first.probes()] == [p.prompt for p in again.probes()]
    assert first.training_statements() != other.training_statements()
    names = [entity.name for entity in first.entities]
    assert len(set(names)) == 30
    assert KnowledgeSet.generate(5, seed=7).entities == first.entities[:5]  # a prefix of a bigger set

    statements = first.training_statements()
    assert len(statements) == 30 * len(ATTRIBUTES) * 3
    held_out = first.probes()
    assert len(held_out) == 30 * len(ATTRIBUTES)
    for probe in held_out:
        mine = [s for s in statements if probe.entity in s]
        assert any(probe.answer in s for s in mine)  # the fact is taught...
        question = probe.prompt.split("\n")[0]
        assert not any(question in s for s in statements)  # ...but never in the probe's words
    for probe in first.probes(held_out=False):
        assert any(s.startswith(probe.prompt + " " + probe.answer) for s in statements)
    restored = KnowledgeSet.from_json(first.to_json())
    assert restored.training_statements() == statements
    assert knowledge_dataset(first)["text"] == first.training_documents()
    with pytest.raises(ValueError, match="num_entities must be an integer"):
        KnowledgeSet.generate(0)
    with pytest.raises(ValueError, match="unknown attributes"):
        first.probes(attributes=("shoe_size",))


MATCH_CASES = [
    (" 1953. He moved", "1953", True), ("1953", "1953", True), ("  Lisbon,", "Lisbon", True),
    (" 19530", "1953", False), (" caterpillar", "cat", False), (" Blue Optics Ltd", "Blue Optics", True),
    (" blue optics", "Blue Optics", False), ("", "cat", False), (" the cello", "cello", False),
    (" anything", "", False), ("", "", False),  # an empty answer is never recalled
]


def test_knowledge_recall_metric_matches_probe_rule():
    metric = load_metric("knowledge_recall")
    predictions, references = [c[0] for c in MATCH_CASES], [c[1] for c in MATCH_CASES]
    expected = [answer_recalled(p, r) for p, r in zip(predictions, references)]
    assert expected == [c[2] for c in MATCH_CASES]
    result = metric.compute(predictions=predictions, references=references)
    assert result == {"exact_match": pytest.approx(sum(expected) / len(expected)), "num_probes": len(expected)}


def test_perplexity_metric_is_token_weighted():
    metric = load_metric("perplexity")
    for nll, count in [(12.0, 4), (3.0, 1)]:
        metric.add(nll_sums=nll, token_counts=count)
    result = metric.compute()
    assert result["perplexity"] == pytest.approx(math.exp(15.0 / 5))
    assert result["num_tokens"] == 5
    with pytest.raises(ValueError, match="No tokens to score"):
        metric.compute(nll_sums=[0.0], token_counts=[0])
    with pytest.raises(ValueError, match="Unknown metric"):
        metric_path("bleu")


def test_general_knowledge_probes_are_well_formed_and_not_taught():
    probes = general_knowledge_probes()
    assert len({p.prompt for p in probes}) == len(probes) >= 30
    assert all(p.answer and p.answer == p.answer.strip() and not p.prompt.endswith(" ") for p in probes)
    # The forgetting probe must not be something the new facts teach.
    taught = " ".join(KnowledgeSet.generate(200, seed=0).training_statements())
    assert not any(p.prompt in taught for p in probes)


def test_training_questions_state_each_fact_in_other_words_than_the_held_out_probes():
    knowledge = KnowledgeSet.generate(5, seed=2, questions_per_fact=2)
    questions = knowledge.training_questions()
    assert len(questions) == 5 * len(ATTRIBUTES) * 2
    assert knowledge.fact_documents() == knowledge.training_statements() + questions
    for probe in knowledge.probes(held_out=True):
        asked = [q for q in questions if probe.entity in q]
        assert not any(q.startswith(probe.prompt) for q in asked)  # never the held-out wording
        assert any(probe.answer in q for q in asked)  # but the fact itself is asked
    assert KnowledgeSet.generate(5, seed=2).training_questions() == []
    assert KnowledgeSet.from_json(knowledge.to_json()).fact_documents() == knowledge.fact_documents()
    with pytest.raises(ValueError, match="questions_per_fact"):
        KnowledgeSet.generate(2, questions_per_fact=3)
