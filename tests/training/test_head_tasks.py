"""Training the heads: classify, listops and mlm runs train, evaluate, resume exactly, load
back as their heads and are scored by ``reformer eval``."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from conftest import StopAt
from reformer import ReformerConfig
from reformer.__main__ import main
from reformer.heads import SLOT_FEATURES, ReformerForMaskedLM, ReformerForSequenceClassification
from reformer.training import checkpoint as ckpt
from reformer.training.config import RunConfig, TrainConfig
from reformer.training.evaluate import evaluate_head_run, evaluate_run
from reformer.training.metrics import classify_examples, evaluate_examples
from reformer.training.trainer import Trainer

TRUNK = dict(d_model=16, n_heads=2, d_ff=32, n_layers=2, attn_layers=("local", "lsh"),
             n_hashes=2, chunk_length=16, local_chunk_length=16, n_chunks_after=1,
             causal=False, dropout=0.1)


@pytest.fixture
def reviews(tmp_path):
    """Labels that a model can read off the text: the first word names the class."""
    rows = [{"text": ("yes " if i % 2 else "no ") + "words " * (i % 9), "label": i % 2}
            for i in range(80)]
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def head_run(task, data=(), vocab=256, seq_len=128, model=None, **changes) -> RunConfig:
    model = ReformerConfig(vocab_size=vocab, max_seq_len=seq_len, **{**TRUNK, **(model or {})})
    train = dict(task=task, data=tuple(str(d) for d in data), seq_len=seq_len, batch_size=4,
                 steps=6, warmup_steps=2, eval_every=3, eval_windows=8, checkpoint_every=100,
                 seed=3, device="cpu", lr=3e-3)
    return RunConfig(model, TrainConfig(**{**train, **changes}), preset=None)


RUNS = {"classify": lambda d: head_run("classify", [d]),
        "listops": lambda d: head_run("listops", vocab=16, seq_len=2048, batch_size=2,
                                      eval_windows=4, pooling="first", head_hidden=16),
        "mlm": lambda d: head_run("mlm", vocab=257),
        "listops-mlm": lambda d: head_run("listops-mlm", vocab=17, seq_len=2048, batch_size=2,
                                          eval_windows=4)}


def records(run_dir, kind):
    lines = (run_dir / ckpt.METRICS_FILE).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.mark.parametrize("task", sorted(RUNS))
def test_head_runs_resume_exactly_and_log_accuracy(tmp_path, reviews, task):
    run = RUNS[task](reviews)
    straight = Trainer.create(tmp_path / "a", run).run_loop()
    assert straight.step == 6 and all("accuracy" in e.metrics for e in straight.evals)
    Trainer.create(tmp_path / "b", run).run_loop(StopAt(3))
    Trainer.resume(tmp_path / "b").run_loop()
    losses = [[r["loss"] for r in records(tmp_path / d, "train")] for d in "ab"]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    evals = records(tmp_path / "a", "eval")
    assert [e["step"] for e in evals] == [0, 3, 6] and 0 <= evals[-1]["val_accuracy"] <= 1

    model, _ = ckpt.load_model(tmp_path / "a")
    masked = task.endswith("mlm")
    kind = ReformerForMaskedLM if masked else ReformerForSequenceClassification
    assert isinstance(model, kind)
    if not masked:
        assert model.n_classes == (2 if task == "classify" else 10)
    if task == "listops":  # the run's hidden layer is rebuilt from its config
        assert model.hidden.inner.out_features == 16
    scored = evaluate_head_run(tmp_path / "a")  # the run's own held-out set, as in training
    bits, metrics = scored[run.model.n_hashes]
    accuracy = metrics["accuracy"]
    assert bits == pytest.approx(evals[-1]["val_bpc"], rel=1e-6)
    assert accuracy == pytest.approx(evals[-1]["val_accuracy"])


def test_a_classifier_learns_the_word_that_names_the_class(tmp_path, reviews):
    run = head_run("classify", [reviews], steps=40, eval_every=40, lr=1e-2,
                   model={"dropout": 0.0})
    result = Trainer.create(tmp_path / "r", run).run_loop()
    assert result.evals[0].metrics["accuracy"] <= 0.75
    assert result.evals[-1].metrics["accuracy"] == 1.0


def test_batched_evaluation_equals_one_example_at_a_time(reviews, tmp_path):
    """Cutting padding columns and batching change nothing (full attention: no rotations)."""
    from reformer.data.task import build_task
    config = ReformerConfig(vocab_size=256, max_seq_len=128, **{**TRUNK, "attn_layers": (
        "full", "local"), "dropout": 0.0})
    torch.manual_seed(0)
    model = ReformerForSequenceClassification(config, 2).double()
    task = build_task(head_run("classify", [reviews]).training.task_spec())
    ids, mask, labels = task.eval_set()
    together = evaluate_examples(model, ids, mask, labels, batch_size=8)
    alone = evaluate_examples(model, ids, mask, labels, batch_size=1)
    assert together[0] == pytest.approx(alone[0], rel=1e-9)
    assert together[1] == alone[1]
    with torch.no_grad():  # by hand, on the padded batch
        out = model(ids, attention_mask=mask, labels=labels)
    assert together[0] == pytest.approx(out.loss.item() / math.log(2), rel=1e-9)
    right = (out.logits.argmax(-1) == labels).float().mean().item()
    assert together[1]["accuracy"] == pytest.approx(right)
    picked, bits = classify_examples(model, ids, mask, labels, batch_size=3)  # each answer
    assert torch.equal(picked, out.logits.argmax(-1))
    by_hand = torch.nn.functional.cross_entropy(out.logits, labels, reduction="none")
    assert torch.allclose(bits, by_hand / math.log(2), rtol=1e-9)
    assert bits.mean().item() == pytest.approx(together[0], rel=1e-9)


def test_cli_trains_and_scores_a_classifier_and_listops_has_a_test_split(tmp_path, reviews,
                                                                         capsys):
    config = tmp_path / "model.json"
    config.write_text(json.dumps(ReformerConfig(vocab_size=256, max_seq_len=256,
                                                **TRUNK).to_dict()))
    out = tmp_path / "run"
    assert main(["train", "--task", "classify", "--data", str(reviews), "--config", str(config),
                 "--steps", "2", "--batch-size", "2", "--eval-windows", "4", "--seq-len",
                 "256", "--device", "cpu", "--head-hidden", "8", "--pooling", "ends",
                 "--pool-width", "3", "--out", str(out)]) == 0
    assert "bits/example" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())["training"]
    assert (saved["head_hidden"], saved["pool_width"]) == (8, 3)
    assert ckpt.load_model(out)[0].head.weight.shape == (2, 2 * 3 * SLOT_FEATURES)
    assert main(["eval", "--checkpoint", str(out), "--windows", "4"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "%" in printed
    assert main(["eval", "--checkpoint", str(out), "--split", "test"]) == 2
    assert "only the listops and listops-mlm tasks have a test split" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(out), "--prompt", "yes"]) == 2
    assert "is a classify run, not a text model; use reformer eval" in capsys.readouterr().err
    with pytest.raises(ValueError, match="evaluate_head_run"):
        evaluate_run(out)
    with pytest.raises(ValueError, match="trained a classify model, which does not generate"):
        ckpt.load_model(out, language_model=True)


def test_heads_refuse_causal_trunks_and_sequence_parallelism(tmp_path, reviews):
    causal = head_run("classify", [reviews])
    causal = RunConfig(causal.model.replace(causal=True, n_chunks_after=0), causal.training)
    with pytest.raises(ValueError, match="causal=True makes a sequence classifier"):
        Trainer.create(tmp_path / "c", causal)
    with pytest.raises(ValueError, match="vocab_size=256 cannot hold the mlm task's 257"):
        Trainer.create(tmp_path / "m", head_run("mlm"))


def listops_pair(tmp_path, **model):
    """A listops-mlm run of 2 steps and the config of a listops run to start from it."""
    pre = head_run("listops-mlm", vocab=17, seq_len=2048, batch_size=2, eval_windows=2,
                   steps=2, eval_every=2, model=model)
    Trainer.create(tmp_path / "pre", pre).run_loop()
    fine = head_run("listops", vocab=17, seq_len=2048, batch_size=2, eval_windows=2, steps=2,
                    eval_every=2, pooling="ends", pool_width=3,  # a head of three parts
                    head_hidden=8,
                    init_from=str(tmp_path / "pre"))
    return pre, fine


def test_init_from_starts_the_trunk_from_another_runs_checkpoint(tmp_path):
    _, fine = listops_pair(tmp_path)
    source, _ = ckpt.load_model(tmp_path / "pre")
    (bits, scores), = evaluate_head_run(tmp_path / "pre", split="test", n_examples=2).values()
    assert math.isfinite(bits) and 0 <= scores["accuracy"] <= 1  # the MLM scores on test too
    started = Trainer.create(tmp_path / "fine", fine)
    assert started.init_step == 2
    theirs, ours = source.state_dict(), started.module.state_dict()
    trunk = [k for k in ours if not k.startswith(ckpt.HEAD_PREFIXES)]
    assert len(trunk) > 10 and set(trunk) < set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in trunk)
    assert ours["head.weight"].shape == (10, 2 * 3 * SLOT_FEATURES)  # fresh, not the MLM's
    fresh = Trainer.create(tmp_path / "fresh", RunConfig(fine.model, replace(
        fine.training, init_from=None)))
    assert fresh.init_step is None and not torch.equal(
        fresh.module.state_dict()["embed.weight"], theirs["embed.weight"])
    started.run_loop()  # a resumed run continues from its own checkpoint, not the source's
    saved, _ = ckpt.load_model(tmp_path / "fine")
    resumed = Trainer.resume(tmp_path / "fine")
    assert resumed.init_step is None
    assert all(torch.equal(v, saved.state_dict()[k])
               for k, v in resumed.module.state_dict().items())
    assert not torch.equal(saved.state_dict()["embed.weight"], theirs["embed.weight"])


def test_init_from_refuses_what_does_not_fit(tmp_path, reversals):
    _, fine = listops_pair(tmp_path, d_ff=48)  # the source's feed-forward is wider
    with pytest.raises(ValueError, match=r"ff.*is \(48, 16\) there but \(32, 16\) here; give "
                       "this run the model config of"):
        Trainer.create(tmp_path / "a", fine)
    deeper = RunConfig(fine.model.replace(n_layers=4, d_ff=48), fine.training)
    with pytest.raises(ValueError, match=r"lacks .* trunk weights \(first: stack\.blocks\.2\."):
        Trainer.create(tmp_path / "b", deeper)
    empty = RunConfig(fine.model, replace(fine.training, init_from=str(tmp_path / "none")))
    with pytest.raises(ValueError, match="holds no checkpoint"):
        Trainer.create(tmp_path / "c", empty)
    with pytest.raises(ValueError, match="init_from=''"):
        replace(fine.training, init_from="")
    pairs = head_run("seq2seq", [reversals], vocab=258, init_from=str(tmp_path / "pre"))
    with pytest.raises(ValueError, match="encoder-decoder has two: leave init_from unset"):
        Trainer.create(tmp_path / "d", pairs)


def test_cli_init_from_names_the_trunk_it_starts_from(tmp_path, capsys, monkeypatch):
    listops_pair(tmp_path)
    config = tmp_path / "model.json"
    config.write_text(json.dumps(ReformerConfig(vocab_size=17, max_seq_len=2048,
                                                **TRUNK).to_dict()))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--task", "listops", "--config", str(config), "--init-from", "pre",
                 "--steps", "1", "--batch-size", "2", "--eval-windows", "2", "--device", "cpu",
                 "--out", "fine"]) == 0
    assert f"trunk from {tmp_path / 'pre'} (step 2)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "fine" / "config.json").read_text())["training"]
    assert saved["init_from"] == str(tmp_path / "pre")  # absolute: resumable from anywhere


@pytest.fixture
def reversals(tmp_path):
    """Pairs whose target is the source reversed."""
    rng = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(60):
        word = "".join(chr(97 + int(c)) for c in torch.randint(0, 4, (5,), generator=rng))
        rows.append({"source": word, "target": word[::-1]})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_seq2seq_batches_frame_the_target_and_label_only_real_tokens(reversals):
    from reformer.data.pairs import BOS, EOS
    from reformer.data.task import build_task
    task = build_task(head_run("seq2seq", [reversals], vocab=258).training.task_spec())
    src, mask, tgt, labels = task.next_batch()
    assert src.shape == mask.shape and tgt.shape == labels.shape and src.shape[0] == 4
    for s, m, t, y in zip(src, mask, tgt, labels, strict=True):
        word = bytes(s[m].tolist())
        real = y != -100
        assert t[real].tolist() == [BOS, *word[::-1], EOS] and torch.equal(y[real], t[real])
        assert not t[~real].any()


def test_seq2seq_run_learns_to_reverse_and_resumes_exactly(tmp_path, reversals):
    from reformer.encoder_decoder import ReformerEncoderDecoder
    run = head_run("seq2seq", [reversals], vocab=258, steps=150, eval_every=75, lr=1e-2,
                   model={"dropout": 0.0, "attn_layers": ("full",)})
    result = Trainer.create(tmp_path / "a", run).run_loop()
    first, last = result.evals[0].metrics, result.evals[-1].metrics
    assert first["exact_match"] == 0.0 and first["accuracy"] < 0.2 and last["accuracy"] > 0.5
    model, _ = ckpt.load_model(tmp_path / "a")
    assert isinstance(model, ReformerEncoderDecoder) and not model.encoder.config.causal
    assert model.decoder.config.causal
    short = RunConfig(run.model, run.training.replace(steps=4, eval_every=2))
    Trainer.create(tmp_path / "b", short).run_loop(StopAt(2))
    Trainer.resume(tmp_path / "b").run_loop()
    Trainer.create(tmp_path / "c", short).run_loop()
    assert records(tmp_path / "b", "train") and [r["loss"] for r in records(
        tmp_path / "b", "train")] == [r["loss"] for r in records(tmp_path / "c", "train")]
    scored = evaluate_head_run(tmp_path / "a")
    assert scored[run.model.n_hashes][1] == pytest.approx(last)
    # rounds at call time reach the model (test_encoder_decoder.py checks they take effect);
    # in these full-attention layers they change nothing
    more = evaluate_head_run(tmp_path / "a", n_hashes=(None, 5))
    assert set(more) == {run.model.n_hashes, 5} and more[5] == more[run.model.n_hashes]


def test_cli_generates_targets_of_a_seq2seq_run(tmp_path, reversals, capsys):
    run = head_run("seq2seq", [reversals], vocab=258, steps=2)
    Trainer.create(tmp_path / "s", run).run_loop()
    flags = ["generate", "--checkpoint", str(tmp_path / "s"), "--prompt", "abcd", "--prompt",
             "dc", "--max-new-tokens", "5"]
    assert main([*flags, "--n", "2", "--seed", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    headers = [line for line in printed if line.startswith("--- source")]
    assert headers == ["--- source 1/2, sample 1/2 ---", "--- source 1/2, sample 2/2 ---",
                       "--- source 2/2, sample 1/2 ---", "--- source 2/2, sample 2/2 ---"]
    assert main([*flags[:5], "--temperature", "0"]) == 0  # greedy, one source
    assert capsys.readouterr().out.startswith("--- source 1/1, sample 1/1 ---")
    assert main([*flags, "--context", "8"]) == 2
    assert "--context applies to language models" in capsys.readouterr().err


def test_export_hf_refuses_a_classifier_run(tmp_path, reviews):
    from reformer.cli.interop import export_run
    Trainer.create(tmp_path / "c", head_run("classify", [reviews], steps=1)).run_loop()
    with pytest.raises(ValueError, match="trained a classify model, which has no Hugging"):
        export_run(tmp_path / "c", tmp_path / "hf", hf_compat=True)
