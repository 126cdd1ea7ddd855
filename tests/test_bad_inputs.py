"""Every bad input: a ValueError naming the value from the library, and from the command line
one line on stderr and exit code 2 -- found before any work is done, so that nothing is lost.

The command-line tests run ``reformer.cli.main`` in-process on two tiny runs trained once per
module: a text run (the model of tests/test_cli.py) and an image run on a folder of pictures.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import train_text_run
from reformer import ReformerConfig, ReformerLM
from reformer.attention import ATTENTION_MODULES
from reformer.cli import main
from reformer.data import images
from reformer.generation import filter_logits, sample
from reformer.training.config import RunConfig, TrainConfig, resolve_run_config

TINY = ReformerConfig(vocab_size=256, d_model=16, n_heads=2, d_ff=32, n_layers=2,
                      attn_layers=("local", "lsh"), n_hashes=2, chunk_length=16,
                      local_chunk_length=16, max_seq_len=64)


def write_pictures(folder: Path, n: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
            folder / f"p{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> Path:
    return train_text_run(tmp_path_factory.mktemp("text"), TINY)


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    """Three 8x8 pictures, 4x4 after resizing: two for training, one held out."""
    d = tmp_path_factory.mktemp("images")
    pictures = write_pictures(d / "pictures", 3)
    assert main(["train", "--task", "images", "--data", str(pictures), "--image-size", "4",
                 "--steps", "1", "--eval-every", "1", "--eval-windows", "1", "--batch-size",
                 "1", "--out", str(d / "run"), "--device", "cpu"]) == 0
    return d / "run"


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``reformer argv``, nothing before it in the capture."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *named: str) -> None:
    assert code == 2, err
    assert err.startswith("reformer ") and err.count("\n") == 1, err
    for text in named:
        assert text in err, err


# ----------------------------------------------------------------------------- --device
@pytest.mark.parametrize("command", [
    ["generate", "--prompt", "hi"], ["eval"], ["synthetic", "eval"], ["complete"],
])
def test_unknown_device_on_a_run_is_one_line(command, text_run, image_run, capsys):
    run = image_run if command == ["complete"] else text_run
    code, out, err = run_cli(capsys, [*command, "--checkpoint", run, "--device", "tpu"])
    assert_one_line_error(code, err, "'tpu'")
    assert out == ""


def test_unknown_device_for_training_is_one_line(tmp_path, capsys):
    (tmp_path / "model.json").write_text(TINY.to_json())
    (tmp_path / "text.txt").write_text("Now is the winter of our discontent. " * 40)
    for argv in (["train", "--config", tmp_path / "model.json", "--data", tmp_path / "text.txt"],
                 ["demo", "--data", tmp_path / "text.txt", "--seq-len", "64"],
                 ["synthetic", "train", "--word-length", "7", "--chunk-length", "4"]):
        code, _, err = run_cli(capsys, [*argv, "--out", tmp_path / "run", "--device", "tpu"])
        assert_one_line_error(code, err, "'tpu'")
    assert not (tmp_path / "run").exists()


def test_train_config_refuses_unknown_devices():
    for device in ("tpu", "cuda:x", ""):
        with pytest.raises(ValueError, match="device"):
            TrainConfig(device=device)
    assert TrainConfig(device="cuda:1").device == "cuda:1"


# ----------------------------------------------------------------------------- generate
@pytest.mark.parametrize("flags, named", [
    (["--temperature", "nan"], "nan"),
    (["--temperature", "inf"], "inf"),
    (["--top-k", "0"], "top_k=0"),
    (["--max-new-tokens", "-5"], "-5"),
    (["--top-p", "0"], "top_p=0"),
    (["--top-p", "2"], "top_p=2"),
    (["--top-p", "nan"], "nan"),
    (["--context", "0"], "context=0"),
    (["--context", "1"], "context=1"),
    (["--context", "100000"], "100000"),
])
def test_generate_refuses_before_printing_anything(flags, named, text_run, capsys):
    code, out, err = run_cli(capsys, ["generate", "--checkpoint", text_run, "--prompt",
                                      "Now is", "--max-new-tokens", "3", *flags])
    assert_one_line_error(code, err, named)
    assert out == ""  # not even the prompt


def test_generate_at_the_limits_works(text_run, capsys):
    code, out, _ = run_cli(capsys, ["generate", "--checkpoint", text_run, "--prompt", "Now",
                                    "--max-new-tokens", "0", "--context", "64", "--top-p", "1",
                                    "--top-k", "1"])
    assert code == 0 and out == "Now\n"


def test_sample_validates_when_called_not_when_iterated():
    model = ReformerLM(TINY)
    prompt = torch.tensor([1, 2, 3])
    for bad, named in [(dict(max_new_tokens=-5), "max_new_tokens=-5"),
                       (dict(temperature=math.nan), "temperature=nan"),
                       (dict(top_k=0), "top_k=0"), (dict(top_p=0.0), "top_p=0"),
                       (dict(top_p=2.0), "top_p=2"), (dict(context=0), "context=0"),
                       (dict(context=65), "context=65")]:
        kwargs = {"max_new_tokens": 3, **bad}
        with pytest.raises(ValueError, match=named):
            sample(model, prompt, **kwargs)  # no next(): the call itself refuses


def test_filter_logits_refuses_bad_filters():
    logits = torch.zeros(8)
    for bad, named in [(dict(temperature=math.inf), "temperature"), (dict(top_k=0), "top_k"),
                       (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"),
                       (dict(top_p=1.5), "top_p")]:
        with pytest.raises(ValueError, match=named):
            filter_logits(logits, **bad)


# --------------------------------------------------------------------------------- eval
@pytest.mark.parametrize("flags, named", [
    (["--n-hashes", "2", "0"], "--n-hashes 0"),
    (["--windows", "0"], "--windows 0"),
    (["--seq-len", "0"], "--seq-len 0"),
])
def test_eval_refuses_zero_instead_of_using_the_default(flags, named, text_run, capsys):
    code, out, err = run_cli(capsys, ["eval", "--checkpoint", text_run, "--device", "cpu",
                                      *flags])
    assert_one_line_error(code, err, named)
    assert out == ""


def test_eval_test_split_names_the_tasks_that_have_one(text_run, capsys):
    code, _, err = run_cli(capsys, ["eval", "--checkpoint", text_run, "--split", "test"])
    assert_one_line_error(code, err, "--split test applies to listops and listops-mlm runs",
                          "is a text run")


def test_held_out_windows_refuse_zero():
    from reformer.data.text import ByteCorpus

    with pytest.raises(ValueError, match="n_windows=0"):
        ByteCorpus([Path(__file__)]).span().windows(8, 0)


def test_synthetic_eval_refuses_zero_sequences(text_run, capsys):
    code, _, err = run_cli(capsys, ["synthetic", "eval", "--checkpoint", text_run,
                                    "--sequences", "0"])
    assert_one_line_error(code, err, "--sequences 0")


# ---------------------------------------------------------------------------------- API
def test_config_refuses_zero_hash_rounds():
    with pytest.raises(ValueError, match="n_hashes=0"):
        ReformerConfig(n_hashes=0)


def test_forward_refuses_zero_hash_rounds():
    with pytest.raises(ValueError, match="n_hashes=0"):
        ReformerLM(TINY)(torch.zeros(1, 5, dtype=torch.long), n_hashes=0)


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_forward_refuses_empty_batches(shape):
    with pytest.raises(ValueError, match=rf"\({shape[0]}, {shape[1]}\)"):
        ReformerLM(TINY)(torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("kind", sorted(ATTENTION_MODULES))
def test_attention_layers_refuse_bad_inputs(kind):
    config = TINY.replace(attn_layers=(kind,))
    layer = ATTENTION_MODULES[kind](config)
    for shape in [(0, 5, 16), (2, 0, 16), (2, 5, 8)]:
        with pytest.raises(ValueError, match="x has shape"):
            layer(torch.zeros(shape))
    with pytest.raises(ValueError, match="n_hashes=0"):
        layer(torch.zeros(1, 5, 16), n_hashes=0)
    with pytest.raises(ValueError, match="attention_mask"):
        layer(torch.zeros(1, 5, 16), attention_mask=torch.ones(1, 4, dtype=torch.bool))


# -------------------------------------------------------------------------------- train
@pytest.mark.parametrize("field, value", [
    ("lr", math.inf), ("lr", math.nan), ("grad_clip", math.nan), ("grad_clip", math.inf),
    ("max_minutes", math.inf), ("max_minutes", math.nan), ("weight_decay", -0.1),
    ("weight_decay", math.nan), ("val_fraction", 0.0), ("val_fraction", 1.0),
    ("min_lr_ratio", math.nan), ("betas", (0.9, 1.5)), ("betas", (math.nan, 0.9)),
    ("warmup_steps", 1.5), ("seed", -1), ("lr", "fast"), ("head_hidden", -1),
    ("head_hidden", 2.5), ("pool_width", 0), ("pool_width", 2.5),
    ("pool_width", 2),  # with the default pooling, "mean"
])
def test_train_config_refuses_non_finite_and_out_of_range(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_run_config_refuses_windows_longer_than_the_model():
    with pytest.raises(ValueError, match="max_seq_len"):
        RunConfig(TINY, TrainConfig(seq_len=128))


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--grad-clip", "nan"),
                                         ("--weight-decay", "-1"), ("--max-minutes", "inf")])
def test_train_refuses_non_finite_numbers_up_front(flag, value, tmp_path, capsys):
    (tmp_path / "text.txt").write_text("Now is the winter of our discontent. " * 40)
    code, out, err = run_cli(capsys, ["train", "--preset", "tiny", "--seq-len", "64", "--data",
                                      tmp_path / "text.txt", "--steps", "1", "--out",
                                      tmp_path / "run", flag, value])
    assert_one_line_error(code, err, value)
    assert out == "" and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------- images
def corrupt_folder(folder: Path) -> Path:
    write_pictures(folder, 4)
    (folder / "a_garbage.png").write_bytes(b"this is not a picture")
    good = (folder / "p00.png").read_bytes()
    (folder / "b_truncated.png").write_bytes(good[: len(good) // 2])
    return folder


def test_corrupt_pictures_are_all_named_at_the_start(tmp_path):
    cfg = resolve_run_config("images-cpu", task="images", image_size=4,
                             data=(str(corrupt_folder(tmp_path / "pictures")),)).training
    with pytest.raises(ValueError, match="a_garbage.png.*b_truncated.png"):
        images.ImageTask(cfg.task_spec())


def test_train_on_corrupt_pictures_fails_before_the_first_step(tmp_path, capsys):
    folder = corrupt_folder(tmp_path / "pictures")
    code, out, err = run_cli(capsys, ["train", "--task", "images", "--data", folder,
                                      "--image-size", "4", "--steps", "1", "--batch-size", "1",
                                      "--out", tmp_path / "run", "--device", "cpu"])
    assert_one_line_error(code, err, "a_garbage.png", "b_truncated.png")
    assert out == ""


# ----------------------------------------------------------------------------- complete
def test_complete_checks_the_output_folder_first(image_run, tmp_path, capsys):
    for out_file in (tmp_path / "missing" / "grid.png", tmp_path / "grid.unknown"):
        code, out, err = run_cli(capsys, ["complete", "--checkpoint", image_run, "--n", "1",
                                          "--samples", "1", "--device", "cpu", "--out",
                                          out_file])
        assert_one_line_error(code, err, str(out_file))
        assert out == ""  # nothing sampled


def test_complete_says_when_fewer_pictures_are_held_out(image_run, tmp_path, capsys):
    code, out, err = run_cli(capsys, ["complete", "--checkpoint", image_run, "--n", "3",
                                      "--samples", "1", "--keep-rows", "2", "--device", "cpu",
                                      "--out", tmp_path / "grid.png"])
    assert code == 0, err
    assert "1 held-out" in err and "3" in err
    assert (tmp_path / "grid.png").exists()


@pytest.mark.parametrize("flags, named", [(["--top-k", "0"], "top_k=0"),
                                          (["--temperature", "nan"], "temperature=nan"),
                                          (["--keep-rows", "4"], "--keep-rows 4")])
def test_complete_refuses_bad_sampling_before_any_work(flags, named, image_run, tmp_path,
                                                       capsys):
    code, out, err = run_cli(capsys, ["complete", "--checkpoint", image_run, "--device", "cpu",
                                      "--out", tmp_path / "grid.png", *flags])
    assert_one_line_error(code, err, named)
    assert out == ""


# ------------------------------------------------------------------ demo, synthetic train
def test_demo_checks_its_sampling_flags_before_training(tmp_path, capsys):
    (tmp_path / "text.txt").write_text("Now is the winter of our discontent. " * 40)
    code, out, err = run_cli(capsys, ["demo", "--data", tmp_path / "text.txt", "--seq-len", "64",
                                      "--steps", "1", "--max-minutes", "0.002", "--eval-windows",
                                      "1", "--out", tmp_path / "demo", "--device", "cpu",
                                      "--prompt-chars", "0"])
    assert_one_line_error(code, err, "--prompt-chars 0")
    assert out == "" and not (tmp_path / "demo").exists()


def test_demo_samples_with_a_prompt_longer_than_the_context(tmp_path, capsys):
    """The sampling context is the model's max_seq_len at most (sample refuses more)."""
    (tmp_path / "text.txt").write_text("Now is the winter of our discontent. " * 40)
    code, out, err = run_cli(capsys, ["demo", "--data", tmp_path / "text.txt", "--seq-len", "64",
                                      "--steps", "1", "--eval-windows", "1", "--out",
                                      tmp_path / "demo", "--device", "cpu", "--prompt-chars",
                                      "70", "--sample-chars", "5"])
    assert code == 0, err
    assert "--- sample: 5 bytes after a 70-byte held-out prompt" in out


def test_synthetic_train_names_the_word_length(tmp_path, capsys):
    code, _, err = run_cli(capsys, ["synthetic", "train", "--word-length", "0", "--out",
                                    tmp_path / "syn", "--device", "cpu"])
    assert_one_line_error(code, err, "--word-length 0")


# --------------------------------------------------------------------------------- help
def help_text(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_help_shows_the_defaults(capsys):
    generate = help_text(capsys, ["generate"])
    assert "(default: 500)" in generate and "(default: 0.8)" in generate
    train = help_text(capsys, ["train"])
    assert "default: the preset's, 2000 for shakespeare" in train  # --steps
    assert "default: the preset's, 0.003 for shakespeare" in train  # --lr
    assert "(default: 1.0)" in train  # --grad-clip, not set by presets
    synthetic = help_text(capsys, ["synthetic", "train"])
    assert "default: the preset's, 0.001 for synthetic" in synthetic  # --lr
    demo = help_text(capsys, ["demo"])
    assert "(default: 3.0)" in demo  # --max-minutes


def test_resolve_device_names_an_unknown_device():
    from reformer.training.trainer import resolve_device

    with pytest.raises(ValueError, match="device='tpu' is not a device"):
        resolve_device("tpu")
