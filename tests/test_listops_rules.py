"""The ListOps report's shallow rules (benchmarks/lra/listops_report.py): the runs of the
root's digit arguments at either end, read off the tree, must be the runs of digit tokens
right after the root operator and right before the closing ']' that a reader of the
sequence sees, or the rule would credit a model with what it cannot read there."""

import importlib.util
from pathlib import Path

import pytest

from reformer import ReformerConfig
from reformer.data import listops
from reformer.training.config import RunConfig, TrainConfig
from reformer.training.evaluate import evaluate_head_run
from reformer.training.metrics import classify_examples
from reformer.training.trainer import Trainer

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "lra" / "listops_report.py"
_SPEC = importlib.util.spec_from_file_location("listops_report", _PATH)
report = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(report)


@pytest.mark.parametrize("text, edge", [
    ("[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]", [4, 3]),
    ("[SM 1 [MAX 2 ] 7 8 ]", [1, 7, 8]),
    ("[MIN 5 6 ]", [5, 6]),  # no nested operator: every digit, once
    ("[MED [SM 1 ] ]", []),
])
def test_edge_digits_of_written_examples(text, edge):
    assert report._edge_digits(listops.parse(text.split())[1]) == edge


def _runs_of_digit_tokens(symbols):
    head = []
    for s in symbols[1:-1]:
        if not s.isdigit():
            break
        head.append(int(s))
    if len(head) == len(symbols) - 2:
        return head
    tail = []
    for s in reversed(symbols[1:-1]):
        if not s.isdigit():
            break
        tail.append(int(s))
    return head + tail[::-1]


def test_edge_digits_are_the_digit_runs_next_to_either_end():
    for i in range(40):
        symbols, _ = listops.example(0, "train", i)
        assert report._edge_digits(listops.parse(symbols)[1]) == _runs_of_digit_tokens(symbols), i


def test_by_root_splits_the_runs_scored_answers(tmp_path, monkeypatch):
    """The breakdown covers every test example, and its accuracy and the rule's add up to
    what the evaluation and the rule score on the same examples."""
    model = ReformerConfig(vocab_size=17, max_seq_len=2048, d_model=16, n_heads=2, d_ff=32,
                           n_layers=2, attn_layers=("local", "lsh"), chunk_length=64,
                           local_chunk_length=64, n_chunks_after=1, causal=False)
    training = TrainConfig(task="listops", seq_len=2048, batch_size=2, steps=2, eval_every=2,
                           eval_windows=2, device="cpu", pooling="ends", pool_width=2)
    Trainer.create(tmp_path / "run", RunConfig(model, training, preset=None)).run_loop()
    passes = []
    monkeypatch.setattr(report, "classify_examples", lambda *a, **k: passes.append(k["n_hashes"])
                        or classify_examples(*a, **k))
    scored, split, right = report.score(tmp_path / "run", 12, [3, model.n_hashes])
    assert passes == [model.n_hashes, 3]  # one pass per number of rounds
    assert set(split) <= {"MAX", "MIN", "MED", "SM"}
    assert sum(c["examples"] for c in split.values()) == 12

    def total(key):
        return sum(c[key] * c["examples"] for c in split.values()) / 12
    by_eval = evaluate_head_run(tmp_path / "run", "test", n_hashes=(None, 3), n_examples=12,
                                device="cpu")
    assert list(scored) == list(by_eval) == [model.n_hashes, 3]  # the trained rounds first
    for rounds, (bits, metrics) in by_eval.items():  # what `reformer eval` prints
        assert scored[rounds]["accuracy"] == pytest.approx(metrics["accuracy"])
        assert scored[rounds]["bits"] == pytest.approx(bits, rel=1e-6)
    assert total("accuracy") == pytest.approx(scored[model.n_hashes]["accuracy"])
    assert sum(right) / 12 == pytest.approx(scored[model.n_hashes]["accuracy"])
    assert total("rule_accuracy") == pytest.approx(report.root_rule("test", 12)["accuracy"])
    assert all(0 <= c["answered_otherwise"] <= 1 for c in split.values())


def test_the_full_attention_comparison_is_the_preset_with_full_attention_only():
    # docs/lra.md compares the listops preset with benchmarks/lra/listops-full.json at the
    # same budget; the comparison is about attention only if nothing else differs.
    from reformer.training.config import resolve_run_config

    preset = resolve_run_config(preset="listops")
    full = resolve_run_config(config_file=_PATH.parent / "listops-full.json")
    assert full.model.attn_layers == ("full",)
    assert full.model == preset.model.replace(attn_layers=("full",))
    assert full.training == preset.training


def test_paired_difference_is_the_mean_and_standard_error_of_per_example_differences():
    import statistics

    first = [True] * 30 + [False] * 10 + [True] * 6 + [False] * 4
    second = [True] * 30 + [False] * 10 + [False] * 6 + [True] * 4
    c = report.paired(first, second)
    d = [int(a) - int(b) for a, b in zip(first, second, strict=True)]
    assert c["difference"] == pytest.approx(statistics.mean(d)) == pytest.approx(2 / 50)
    assert c["standard_error"] == pytest.approx(statistics.stdev(d) / len(d) ** 0.5)
    assert (c["only_first_right"], c["only_second_right"]) == (6, 4)
    assert report.paired(first, first)["standard_error"] == 0
    with pytest.raises(ValueError, match="50 and 3 answers"):
        report.paired(first, second[:3])
