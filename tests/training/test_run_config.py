"""Presets, TrainConfig validation, and how a run's configuration is assembled."""

from __future__ import annotations

import json
import math

import pytest

from reformer import ReformerConfig
from reformer.data.task import task_head
from reformer.presets import PRESETS, get_preset, with_seq_len
from reformer.training.config import RunConfig, TrainConfig, resolve_run_config
from reformer.training.optim import build_optimizer, lr_at


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_consistent(name):
    preset = get_preset(name)
    train = TrainConfig(**preset.training)
    assert preset.model.max_seq_len == train.seq_len
    assert preset.model.vocab_size >= build_task_vocab(train.task)
    assert preset.model.causal == (task_head(train.task) == "lm")  # the heads read both ways


def build_task_vocab(task: str) -> int:
    return {"text": 256, "images": 256, "synthetic": 128, "classify": 256, "listops": 16,
            "mlm": 257, "listops-mlm": 17, "seq2seq": 258}[task]


def test_listops_and_its_pre_training_share_one_trunk():
    """--init-from needs the same trunk: the listops-mlm preset's must fit the listops one's."""
    assert get_preset("listops").model == get_preset("listops-mlm").model


def test_enwik8_is_the_papers_model():
    m = get_preset("enwik8").model
    assert (m.n_layers, m.d_model, m.d_ff, m.n_heads, m.max_seq_len) == (12, 1024, 4096, 8, 65536)
    assert [m.layer_kind(i) for i in range(12)].count("lsh") == 3


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*tiny"):
        get_preset("huge")


def test_with_seq_len_rederives_axial_shape():
    c = with_seq_len(get_preset("shakespeare").model, 4096)
    assert c.max_seq_len == 4096 and math.prod(c.axial_pos_shape) >= 4096
    assert c.axial_pos_shape == (64, 64)


def test_resolve_run_config_preset_then_overrides():
    run = resolve_run_config("tiny", seq_len=512, lr=1e-3, steps=None)
    assert run.preset == "tiny" and run.training.seq_len == 512 and run.model.max_seq_len == 512
    assert run.training.lr == 1e-3 and run.training.steps == PRESETS["tiny"].training["steps"]
    assert resolve_run_config().preset == "shakespeare"


def test_resolve_run_config_from_files(tmp_path):
    model = ReformerConfig(d_model=32, n_heads=2, d_ff=64, n_layers=2, max_seq_len=256)
    (tmp_path / "m.json").write_text(model.to_json())
    run = resolve_run_config(config_file=tmp_path / "m.json")
    assert run.model == model and run.training.seq_len == 256 and run.preset is None
    full = RunConfig(model, TrainConfig(seq_len=128, lr=1e-4), "tiny")
    (tmp_path / "run.json").write_text(full.to_json())
    run = resolve_run_config(config_file=tmp_path / "run.json")
    assert run.training.lr == 1e-4 and run.model.max_seq_len == 128
    assert RunConfig.from_json(full.to_json()) == full


@pytest.mark.parametrize("content, message", [("{nope", "not valid JSON"),
                                              (json.dumps({"d_modle": 3}), "unknown config")])
def test_bad_config_file(tmp_path, content, message):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        resolve_run_config(config_file=tmp_path / "bad.json")


@pytest.mark.parametrize("changes, message", [
    (dict(steps=0), "steps=0 must be a positive"), (dict(precision="fp8"), "precision"),
    (dict(lr=-1.0), "lr=-1.0"), (dict(max_minutes=0), "max_minutes"),
    (dict(eval_n_hashes=(0,)), "eval_n_hashes"), (dict(banana=1), "unknown training")])
def test_train_config_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(changes)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1 * (0.1 + 0.9 * 0.5 * (1 + math.cos(0))))
    assert lr_at(cfg, 9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.09)))
    assert lr_at(cfg, 50) == pytest.approx(0.55)
    assert lr_at(cfg, 100) == pytest.approx(0.1)
    timed = cfg.replace(max_minutes=1.0)  # half the time spent: half-way down
    assert lr_at(timed, 10, elapsed_s=30.0) == pytest.approx(0.55)


def test_weight_decay_only_on_linear_weights(make_model):
    model = make_model()
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(model.head.weight) in decayed and id(model.embed.weight) not in decayed
    assert id(model.norm.weight) not in decayed and id(model.head.bias) not in decayed
    n = sum(len(g["params"]) for g in opt.param_groups)
    assert n == len(list(model.parameters()))
