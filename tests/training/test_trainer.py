"""The training loop: exact resume, run directory contents, signals, budgets, errors."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from conftest import StopAt
from reformer import ReformerConfig
from reformer.training import checkpoint as ckpt
from reformer.training.config import RunConfig, TrainConfig
from reformer.training.evaluate import evaluate_run
from reformer.training.trainer import Callback, Trainer

# LSH rotations from the global RNG (no hash_seed) and dropout: resuming must replay both.
MODEL = ReformerConfig(vocab_size=256, d_model=16, n_heads=2, d_ff=32, n_layers=2,
                       attn_layers=("local", "lsh"), n_hashes=2, chunk_length=16,
                       local_chunk_length=16, max_seq_len=64, dropout=0.1)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(b"To be, or not to be, that is the question. " * 40)
    return path


def make_run(corpus, **changes) -> RunConfig:
    train = dict(data=(str(corpus),), seq_len=64, batch_size=1, grad_accum=2, steps=6,
                 warmup_steps=2, eval_every=3, eval_windows=2, checkpoint_every=100, seed=3,
                 device="cpu")
    return RunConfig(MODEL, TrainConfig(**{**train, **changes}), preset=None)


def train_losses(run_dir) -> list[float]:
    records = ckpt.Path(run_dir, ckpt.METRICS_FILE).read_text().splitlines()
    return [r["loss"] for r in map(json.loads, records) if r["kind"] == "train"]


def test_resume_reproduces_the_uninterrupted_run(tmp_path, corpus):
    straight = Trainer.create(tmp_path / "a", make_run(corpus)).run_loop()
    assert straight.stop_reason == "steps" and straight.step == 6

    first = Trainer.create(tmp_path / "b", make_run(corpus)).run_loop(StopAt(3))
    assert first.stop_reason == "test" and first.step == 3 and first.interrupted
    resumed = Trainer.resume(tmp_path / "b")
    assert resumed.step == 3
    second = resumed.run_loop()
    assert second.step == 6

    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    assert len(train_losses(tmp_path / "b")) == 6
    assert [e.val_bpc for e in straight.evals] == [e.val_bpc for e in second.evals]
    a = ckpt.load_model(tmp_path / "a")[0].state_dict()
    b = ckpt.load_model(tmp_path / "b")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_directory_contents(tmp_path, corpus):
    run = make_run(corpus, steps=2)
    Trainer.create(tmp_path / "r", run).run_loop()
    d = tmp_path / "r"
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [ckpt.CONFIG_FILE, "step-00000002", ckpt.METRICS_FILE, ckpt.PLOT_FILE, ckpt.LOCK_FILE])
    assert sorted(p.name for p in (d / "step-00000002").iterdir()) == [ckpt.WEIGHTS_FILE,
                                                                      ckpt.STATE_FILE]
    assert ckpt.read_config(d) == run
    assert (d / ckpt.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kinds = [json.loads(line)["kind"] for line in (d / ckpt.METRICS_FILE).open()]
    assert kinds == ["eval", "train", "train", "eval"]
    state = torch.load(d / "step-00000002" / ckpt.STATE_FILE, weights_only=True)
    assert set(state) >= {"step", "elapsed_s", "optimizer", "rng", "data"}


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, corpus):
    class Term(Callback):
        def on_step(self, trainer, report):
            if report.step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    result = Trainer.create(tmp_path / "r", make_run(corpus)).run_loop(Term(), handle_signals=True)
    assert result.stop_reason == "SIGTERM" and result.step == 2
    assert signal.getsignal(signal.SIGTERM) is previous
    assert Trainer.resume(tmp_path / "r").step == 2


def test_time_budget_stops_the_run(tmp_path, corpus):
    run = make_run(corpus, steps=10_000, max_minutes=0.02)
    trainer = Trainer.create(tmp_path / "r", run)
    result = trainer.run_loop()
    assert result.stop_reason == "time" and result.step < 10_000
    assert trainer.elapsed_s <= 0.02 * 60 + 0.5  # the last step was expected to fit


def test_bf16_autocast_trains(tmp_path, corpus):
    result = Trainer.create(tmp_path / "r", make_run(corpus, steps=2, precision="bf16")).run_loop()
    assert all(0 < loss < 6 for loss in train_losses(tmp_path / "r"))
    assert all(0 < e.val_bpc < 9 for e in result.evals)


def test_resume_may_extend_steps_but_not_change_the_model_or_data(tmp_path, corpus):
    Trainer.create(tmp_path / "r", make_run(corpus, steps=2)).run_loop()
    with pytest.raises(ValueError, match="already holds a trained run"):
        Trainer.create(tmp_path / "r", make_run(corpus))
    with pytest.raises(ValueError, match="another model config.*d_model: 16 -> 32"):
        Trainer.resume(tmp_path / "r", MODEL.replace(d_model=32))
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.003 -> 0.1\)"):
        Trainer.resume(tmp_path / "r", changes={"lr": 0.1})
    assert Trainer.resume(tmp_path / "r", changes={"steps": 4}).run_loop().step == 4
    corpus.write_bytes(corpus.read_bytes() * 2)
    with pytest.raises(ValueError, match="the data changed"):
        Trainer.resume(tmp_path / "r")


def test_weights_from_another_config_are_refused(tmp_path, corpus):
    Trainer.create(tmp_path / "r", make_run(corpus, steps=1)).run_loop()
    other = RunConfig(MODEL.replace(d_ff=48), make_run(corpus).training)
    ckpt.write_config(tmp_path / "r", other)
    with pytest.raises(ValueError, match="does not fit the model"):
        ckpt.load_model(tmp_path / "r")


def test_missing_data_and_no_run(tmp_path, corpus):
    with pytest.raises(ValueError, match="no such file"):
        Trainer.create(tmp_path / "r", make_run(tmp_path / "absent.txt"))
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="not a run directory"):
        Trainer.resume(tmp_path / "r")


def test_evaluate_run_with_several_hash_rounds(tmp_path, corpus):
    Trainer.create(tmp_path / "r", make_run(corpus, steps=1)).run_loop()
    table = evaluate_run(tmp_path / "r", n_hashes=(1, 2, 4), device="cpu")
    assert list(table) == [1, 2, 4] and all(0 < v < 9 for v in table.values())
    assert evaluate_run(tmp_path / "r", device="cpu")[2] == pytest.approx(table[2])
    other = evaluate_run(tmp_path / "r", data=[corpus], n_windows=1, seq_len=32, device="cpu")
    assert list(other) == [2]


@pytest.mark.parametrize("task", ["images", "synthetic"])
def test_other_tasks_resume_exactly_and_log_their_metrics(tmp_path, task):
    """The same loop, checkpoints and resume serve pictures and the duplication task."""
    if task == "images":
        from PIL import Image
        folder = tmp_path / "pics"
        folder.mkdir()
        for i in range(6):
            Image.new("RGB", (9, 7), (30 * i, 90, 200 - 20 * i)).save(folder / f"{i}.png")
        train = dict(task="images", data=(str(folder),), image_size=4, seq_len=48,
                     val_fraction=0.34)
        model = MODEL.replace(max_seq_len=48, axial_pos_shape=(4, 4, 3), axial_pos_dims=None)
    else:
        train = dict(task="synthetic", seq_len=64)
        model = MODEL.replace(vocab_size=128)
    train.update(batch_size=2, steps=4, warmup_steps=1, eval_every=2, eval_windows=2,
                 checkpoint_every=100, seed=1, device="cpu")
    run = RunConfig(model, TrainConfig(**train))
    Trainer.create(tmp_path / "a", run).run_loop()
    Trainer.create(tmp_path / "b", run).run_loop(StopAt(2))
    Trainer.resume(tmp_path / "b").run_loop()
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    evals = [json.loads(x) for x in (tmp_path / "a" / ckpt.METRICS_FILE).open()
             if json.loads(x)["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert ("val_accuracy" in evals[-1]) == (task == "synthetic")


def test_the_vocabulary_must_hold_the_tasks_symbols(tmp_path):
    run = RunConfig(MODEL.replace(vocab_size=100), TrainConfig(task="synthetic", seq_len=64,
                                                               device="cpu"))
    with pytest.raises(ValueError, match="cannot hold the synthetic task's 128 symbols"):
        Trainer.create(tmp_path / "r", run)


def test_states_saved_before_tasks_existed_still_resume(tmp_path, corpus):
    Trainer.create(tmp_path / "r", make_run(corpus)).run_loop(StopAt(3))
    path = ckpt.latest_checkpoint(tmp_path / "r").state
    state = torch.load(path, weights_only=False)
    fingerprint = state["data"].pop("fingerprint")
    state["data"].update(fingerprint)  # the old layout: train_bytes, val_bytes
    state["evals"] = [e[:3] for e in state["evals"]]
    torch.save(state, path)
    resumed = Trainer.resume(tmp_path / "r")
    assert resumed.step == 3 and resumed.evals[0].metrics == {}
    assert resumed.run_loop().step == 6
