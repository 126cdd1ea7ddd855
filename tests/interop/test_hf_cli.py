"""``reformer import-hf`` and ``reformer export-hf``: an HF directory becomes a run that
generates, evaluates, fine-tunes and exports back to the same weights; mistakes are one line
on stderr with exit code 2."""

from __future__ import annotations

import json

import pytest

from reformer.cli import main
from reformer.interop.hf import from_hf

from .test_hf_io import HF_TINY, assert_states_equal, random_hf_state, write_hf_dir

CLI_HF = {**HF_TINY, "vocab_size": 256, "axial_pos_shape": [8, 8],
          "max_position_embeddings": 64, "local_attn_chunk_length": 8}


@pytest.fixture
def hf_dir(tmp_path):
    (tmp_path / "text.txt").write_text("Now is the winter of our discontent. " * 40)
    state = {k: v.float() for k, v in random_hf_state(CLI_HF).items()}
    return write_hf_dir(tmp_path / "hf", CLI_HF, state)


def test_import_generate_eval_export_and_fine_tune(hf_dir, capsys):
    d = hf_dir.parent
    assert main(["import-hf", str(hf_dir), "--out", str(d / "run"), "--data", str(d / "text.txt"),
                 "--seq-len", "32", "--batch-size", "2", "--device", "cpu"]) == 0
    assert "at step 0" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(d / "run"), "--prompt", "Now",
                 "--max-new-tokens", "8", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("Now")
    assert main(["eval", "--checkpoint", str(d / "run"), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["hash", "rounds", "bits/char"]
    assert main(["export-hf", str(d / "run"), "--out", str(d / "back")]) == 0
    assert_states_equal(from_hf(d / "back").state_dict(), from_hf(hf_dir).state_dict())
    assert main(["train", "--out", str(d / "run"), "--resume", "--steps", "1",
                 "--eval-every", "1", "--eval-windows", "1"]) == 0
    assert "finished 1 steps" in capsys.readouterr().out


def test_cli_refusals_are_one_line(hf_dir, capsys):
    d = hf_dir.parent
    data = ["--data", str(d / "text.txt"), "--seq-len", "32", "--device", "cpu"]
    small = write_hf_dir(d / "small", HF_TINY, random_hf_state(HF_TINY))
    assert main(["import-hf", str(hf_dir), "--out", str(d / "run"), *data]) == 0
    capsys.readouterr()
    for argv, message in (
            (["import-hf", str(small), "--out", str(d / "r1"), *data], "vocab_size=32"),
            (["import-hf", str(hf_dir), "--out", str(d), *data], "is not empty"),
            (["import-hf", str(hf_dir), "--out", str(d / "run"), *data], "already holds a run"),
            (["export-hf", str(d / "none"), "--out", str(d / "x")], "not a run directory"),
            (["export-hf", str(d / "run"), "--out", str(d / "hf")], "not an empty folder")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, argv
    config = json.loads((d / "run" / "config.json").read_text())
    config["model"]["hf_compat"] = False  # as if trained without it
    (d / "run" / "config.json").write_text(json.dumps(config))
    assert main(["export-hf", str(d / "run"), "--out", str(d / "out")]) == 2
    assert "--hf-compat" in capsys.readouterr().err
    assert main(["export-hf", str(d / "run"), "--out", str(d / "out"), "--hf-compat"]) == 0
    assert from_hf(d / "out").config.hf_compat


def test_generate_prints_ids_past_the_bytes_as_replacement_characters(tmp_path, capsys):
    # google/reformer-enwik8 has 258 ids; a model that samples 256 or 257 must not crash
    hf = {**CLI_HF, "vocab_size": 258}
    state = {k: v.float() for k, v in random_hf_state(hf).items()}
    for name in ("lm_head.bias", "lm_head.decoder.bias"):
        state[name][257] = 100.0  # always the last id
    (tmp_path / "text.txt").write_text("Now is the winter of our discontent. " * 40)
    source = write_hf_dir(tmp_path / "hf", hf, state)
    assert main(["import-hf", str(source), "--out", str(tmp_path / "run"), "--data",
                 str(tmp_path / "text.txt"), "--seq-len", "32", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "Now",
                 "--max-new-tokens", "4", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("Now\ufffd\ufffd\ufffd\ufffd")
