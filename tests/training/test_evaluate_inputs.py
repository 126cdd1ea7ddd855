"""evaluate_run / evaluate_attentions: 0 is a mistake named in the error, not 'the default'."""

from __future__ import annotations

import pytest

from reformer.training.evaluate import evaluate_attentions, evaluate_run
from reformer.training.trainer import Trainer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from reformer.training.config import resolve_run_config

    d = tmp_path_factory.mktemp("run")
    (d / "text.txt").write_text("Now is the winter of our discontent. " * 40)
    run = resolve_run_config("tiny", data=(str(d / "text.txt"),), seq_len=64, steps=1,
                             eval_windows=1, batch_size=1, device="cpu")
    trainer = Trainer.create(d / "run", run)
    trainer.run_loop()
    return d / "run"


@pytest.mark.parametrize("kwargs, name", [(dict(n_hashes=(0,)), "n_hashes"),
                                          (dict(n_windows=0), "n_windows"),
                                          (dict(seq_len=0), "seq_len")])
def test_evaluate_run_refuses_zero(run_dir, kwargs, name):
    with pytest.raises(ValueError, match=f"{name}=0"):
        evaluate_run(run_dir, device="cpu", **kwargs)


def test_evaluate_attentions_refuses_zero_sequences(run_dir):
    with pytest.raises(ValueError, match="n_sequences=0"):
        evaluate_attentions(run_dir, ["full"], device="cpu", n_sequences=0)


def test_none_means_the_runs_own_settings(run_dir):
    assert set(evaluate_run(run_dir, device="cpu")) == {2}  # the tiny preset's rounds
