"""The demo's report: the table's perplexity change is relative to the base (the first row), recall and
general knowledge kept are printed as percentages, and the figure is written. The demo itself runs
SmolLM2 for minutes and is run by hand (`memory-llama demo`)."""

import json

from modeling_memory.tools import demo


def _result(held_out, training, kept, perplexity, trainable):
    return {"recall_held_out": held_out, "recall_training_phrasing": training, "general_knowledge_kept": kept,
            "natural_text_perplexity": perplexity, "trainable_parameters": trainable}


def test_results_table_json_and_figure(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "OUTPUT_DIR", tmp_path / "demo")
    results = {"base": _result(0.03, 0.01, 1.0, 40.0, 0), "tuned": _result(0.0, 0.25, 0.9, 41.0, 1234)}
    losses = {"tuned": [3.0, 2.5, 2.0]}
    demo.write_outputs(results, losses, {"seconds": 1.0})

    table = (tmp_path / "demo" / "results.md").read_text().splitlines()
    assert table[2] == "| base | 0 | 1.0% | 3.0% | 40.00 (+0.0%) | 100% |"
    assert table[3] == "| tuned | 1,234 | 25.0% | 0.0% | 41.00 (+2.5%) | 90% |"  # 41 / 40 - 1
    assert "| tuned | 1,234 |" in capsys.readouterr().out
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert saved["results"]["tuned"]["perplexity_change"] == 41.0 / 40.0 - 1 and saved["losses"] == losses
    assert (tmp_path / "demo" / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trainable_weights_of_sparse_memory_fine_tuning_count_only_the_chosen_rows():
    import torch

    from conftest import tiny_config
    from modeling_memory import MemoryLlamaForCausalLM
    from modeling_memory.training.peft_modes import trainable_parameter_counts
    from modeling_memory.training.sparse_memory_finetuning import prepare_sparse_memory_finetuning

    model = MemoryLlamaForCausalLM(tiny_config(chapter_layers=[], engram_layers=[], pkm_layers=[1], pkm_num_keys=6,
                                               pkm_top_k=3, pkm_heads=2, pkm_key_dim=8))
    everything = sum(p.numel() for p in model.parameters())
    assert trainable_parameter_counts(model)["total"] == everything
    prepare_sparse_memory_finetuning(model, {"model.pkm_values.weight": torch.tensor([0, 5, 7])})
    assert trainable_parameter_counts(model)["total"] == 3 * model.model.pkm_values.weight.shape[1]


def _rows(sparse_recall, lora_recall, sparse_perplexity, kept):
    return {
        demo.BASE_ROW: _result(0.03, 0.01, 1.0, 40.0, 0),
        demo.SPARSE_MEMORY_ROW: _result(0.04, sparse_recall, kept, sparse_perplexity, 9_216_000),
        demo.LORA_ROW: _result(0.08, lora_recall, 0.54, 33.2, 4_884_480),
    }


def test_verdict_says_for_each_target_whether_it_was_met():
    """One line per target of (a): recall in the training phrasing at least LoRA's, perplexity up by at most 2 %,
    at least 95 % of the base's general knowledge kept (README, "The demo")."""
    assert demo.verdict(_rows(0.146, 0.115, 35.8, 0.96)) == [
        "target met: (a) recalls at least as many new facts as LoRA (training phrasing): 14.6% vs 11.5%",
        "target met: (a) natural-text perplexity rises by at most 2%: -10.5%",  # 35.8 / 40 - 1
        "target met: (a) keeps at least 95% of the base's general knowledge: 96%",
    ]
    assert demo.verdict(_rows(0.104, 0.115, 40.9, 0.93)) == [
        "target NOT met: (a) recalls at least as many new facts as LoRA (training phrasing): 10.4% vs 11.5%",
        "target NOT met: (a) natural-text perplexity rises by at most 2%: +2.2%",  # 40.9 / 40 - 1
        "target NOT met: (a) keeps at least 95% of the base's general knowledge: 93%",
    ]
    # On the bounds: recall equal to LoRA's and exactly 95 % kept meet their targets.
    assert all(line.startswith("target met") for line in demo.verdict(_rows(0.115, 0.115, 40.7, 0.95)))
