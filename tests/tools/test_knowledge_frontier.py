"""The frontier's bookkeeping against hand-worked examples: which point of a run counts, and the envelope drawn."""

from modeling_memory.tools.knowledge_frontier import _unrelated_passages, _upper_envelope, best_point, compare_at_best_recall


def point(step, recall, kept, held_out=0.0):
    return {"step": step, "training phrasing": recall, "held-out phrasing": held_out, "general knowledge kept": kept}


def test_best_point_is_the_most_recall_that_keeps_enough():
    run = {"points": [point(0, 0.0, 1.0), point(20, 0.4, 1.0), point(40, 0.9, 0.96), point(60, 1.0, 0.9)]}
    assert best_point(run)["step"] == 40  # step 60 recalls more but keeps under 95 %
    assert best_point(run, min_kept=0.99)["step"] == 20
    assert best_point({"points": [point(0, 0.0, 1.0), point(20, 1.0, 0.5)]}) is None  # the untrained point never counts


def test_best_point_by_held_out_recall():
    run = {"points": [point(0, 0.0, 1.0), point(20, 0.9, 0.97, held_out=0.3), point(40, 0.8, 0.96, held_out=0.6)]}
    assert best_point(run)["step"] == 20
    assert best_point(run, measure="held-out phrasing")["step"] == 40


def test_comparison_at_the_other_methods_best_recall():
    """At the most the other method recalls (0.6, where it keeps 0.5), the first keeps 0.9: its best point that
    recalls at least as much, not its best overall (0.95 at recall 0.4) nor its last."""
    ours = [point(10, 0.4, 0.95), point(20, 0.6, 0.9), point(30, 0.8, 0.7)]
    other = [point(10, 0.3, 0.8), point(20, 0.6, 0.5), point(30, 0.6, 0.4)]
    assert compare_at_best_recall(ours, other) == {"recall": 0.6, "kept": 0.9, "other_kept": 0.5}
    assert compare_at_best_recall(ours[:1], other)["kept"] is None  # never recalls 0.6


def test_upper_envelope_is_the_best_recall_at_each_level_of_knowledge_kept():
    points = [(1.0, 0.2), (0.96, 0.5), (0.96, 0.4), (0.9, 0.45), (0.8, 0.9)]
    assert _upper_envelope(points) == [(1.0, 0.2), (0.96, 0.5), (0.8, 0.9)]


def test_unrelated_passages_end_at_a_sentence_and_repeat_when_few():
    texts = ["short.", "One sentence here. " * 30]
    passages = _unrelated_passages(texts, 3)
    assert len(passages) == 3 and len(set(passages)) == 1
    assert passages[0].endswith(".") and len(passages[0]) <= 300


def test_benchmark_summary_names_each_methods_best_point_and_the_comparisons():
    from benchmarks.knowledge_frontier import frontier_summary

    def run(method, learning_rate, points):
        return {"method": method, "learning_rate": learning_rate, "replay": False, "points": [point(0, 0.0, 1.0)] + points}

    runs = [run("sparse_memory", 0.3, [point(20, 0.8, 0.96, held_out=0.5)]), run("sparse_memory", 1.0, [point(20, 0.9, 0.8)]),
            run("lora", 1e-3, [point(20, 0.6, 0.2)]), run("full", 1e-4, [point(20, 0.95, 0.5)])]
    assert frontier_summary(runs) == [
        "- sparse memory FT (product keys), facts alone: 80% (training phrasing), 50% (held-out) at 96% kept (lr 0.3, step 20)",
        "- LoRA r=16, facts alone: no point keeps 95%",
        "- full fine-tuning, facts alone: no point keeps 95%",
        "- at the most LoRA r=16 recalls (60%, keeping 20%), sparse memory FT (product keys) keeps 96%",
        "- at the most full fine-tuning recalls (95%, keeping 50%), sparse memory FT (product keys) never recalls as much",
    ]
