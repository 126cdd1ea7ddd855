"""The command line: train -> generate -> eval on a tiny model, demo, and one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reformer import ReformerConfig
from reformer.cli import main

TINY = ReformerConfig(vocab_size=256, d_model=16, n_heads=2, d_ff=32, n_layers=2,
                      attn_layers=("local", "lsh"), n_hashes=2, chunk_length=16,
                      local_chunk_length=16, max_seq_len=64)


@pytest.fixture
def setup(tmp_path):
    (tmp_path / "model.json").write_text(TINY.to_json())
    (tmp_path / "text.txt").write_text("Now is the winter of our discontent. " * 40)
    return tmp_path


def train_args(d: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(d / "model.json"), "--data", str(d / "text.txt"),
            "--steps", "3", "--eval-every", "2", "--eval-windows", "1", "--batch-size", "2",
            "--out", str(d / "run"), "--device", "cpu", *extra]


def test_train_generate_eval(setup, capsys):
    assert main(train_args(setup, "--eval-n-hashes", "4")) == 0
    out = capsys.readouterr().out
    assert "validation bpc" in out and "finished 3 steps" in out
    assert "validation bits/char" in out and "4 rounds" in out
    config = json.loads((setup / "run" / "config.json").read_text())
    assert config["model"]["d_model"] == 16 and config["training"]["steps"] == 3
    assert (setup / "run" / "plot.png").exists()

    assert main(["generate", "--checkpoint", str(setup / "run"), "--prompt", "Now is",
                 "--max-new-tokens", "12", "--top-k", "5", "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("Now is") and len(first.encode()) >= len("Now is")
    main(["generate", "--checkpoint", str(setup / "run"), "--prompt", "Now is",
          "--max-new-tokens", "12", "--top-k", "5", "--seed", "1"])
    assert capsys.readouterr().out == first  # seeded sampling is reproducible

    assert main(["eval", "--checkpoint", str(setup / "run"), "--n-hashes", "1", "2",
                 "--device", "cpu"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["hash", "rounds", "bits/char"] and len(table) == 3


def test_emulated_bf16_is_flagged_when_a_run_starts(setup, capsys, monkeypatch):
    monkeypatch.setattr("reformer.training.metrics.cpu_has_native_bf16", lambda: False)
    assert main(train_args(setup, "--precision", "bf16", "--steps", "1")) == 0
    assert "bf16 is emulated" in capsys.readouterr().out


def test_resume_continues_and_rejects_another_config(setup, capsys):
    assert main(train_args(setup)) == 0
    assert main(train_args(setup)) == 2  # the run exists: --resume or another --out
    assert "already holds a trained run" in capsys.readouterr().err
    assert main(["train", "--out", str(setup / "run"), "--resume", "--steps", "4"]) == 0
    assert "resuming at step 3" in capsys.readouterr().out
    assert main(["train", "--out", str(setup / "run"), "--resume", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "another model config" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "/no/such/file.txt"], "no such file or folder"),
    (["generate", "--checkpoint", "/no/such/run"], "not a run directory"),
    (["train", "--resume"], "--resume needs --out"),
])
def test_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("reformer ") and message in err and err.count("\n") == 1


def test_empty_data_is_an_error(setup, capsys):
    (setup / "empty.txt").write_bytes(b"")
    assert main(["train", "--config", str(setup / "model.json"), "--data",
                 str(setup / "empty.txt"), "--out", str(setup / "r")]) == 2
    assert "empty" in capsys.readouterr().err


def test_bad_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--precision", "fp8"])
    assert exit_info.value.code == 2


def test_demo_trains_evaluates_and_samples(setup, capsys):
    code = main(["demo", "--data", str(setup / "text.txt"), "--seq-len", "64",
                 "--max-minutes", "0.002", "--out", str(setup / "demo"), "--device", "cpu",
                 "--prompt-chars", "40", "--sample-chars", "10", "--eval-windows", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "before ->" in out and "--- sample" in out and "reformer generate" in out
    assert (setup / "demo" / "plot.png").exists()


def python_m_reformer(*args: str, **kwargs) -> subprocess.Popen:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kwargs}
    return subprocess.Popen([sys.executable, "-m", "reformer", *args], env=env, text=True,
                            **streams)


def test_python_dash_m():
    out, _ = python_m_reformer("--help").communicate()
    assert "train" in out and "generate" in out


def test_ctrl_c_saves_a_checkpoint_that_resumes(setup):
    """A real SIGINT to a real process, sent once it has trained two steps (whenever that
    is: the first native build alone can take minutes on a busy machine): it finishes the
    step, saves, and exits with 130."""
    log = (setup / "out.txt").open("w+"), (setup / "err.txt").open("w+")  # no pipe to fill
    proc = python_m_reformer(*train_args(setup, "--steps", "100000", "--eval-every", "100000"),
                             stdout=log[0], stderr=log[1])
    metrics = setup / "run" / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists()
                                       and metrics.read_text().count('"train"') >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.wait()
    out, err = ((setup / name).read_text() for name in ("out.txt", "err.txt"))
    assert proc.returncode == 130, err
    assert "stopped by SIGINT" in out and "--resume" in out
    assert main(train_args(setup, "--resume", "--steps", "2")) == 0  # its checkpoint loads


# Run as the console script does, but with an import hook that holds the start-up inside
# PyTorch's import (where a traceback used to come from) until the signal arrives.
_INSIDE_TORCH_IMPORT = """
import signal, sys, time
class Hold:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("importing torch", file=sys.stderr, flush=True)
            while signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                time.sleep(0.01)  # Ctrl-C raises KeyboardInterrupt here, inside the import
sys.meta_path.insert(0, Hold())
from reformer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_while_starting_exits_130_without_a_traceback(setup):
    """SIGINT while the command is still importing PyTorch: one line, exit 130."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    # SIGINT at its default in the child: a shell's background job (a CI runner's) may have
    # it ignored, and Python keeps an ignored SIGINT ignored
    proc = subprocess.Popen([sys.executable, "-c", _INSIDE_TORCH_IMPORT, *train_args(setup)],
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stderr.readline() == "importing torch\n"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.splitlines()[-1] == "reformer train: interrupted"


def test_images_train_complete_eval(tmp_path, capsys):
    """The default pictures (scikit-image crops) through train -> complete -> eval."""
    run = tmp_path / "img"
    assert main(["train", "--task", "images", "--image-size", "4", "--steps", "2",
                 "--eval-every", "1", "--eval-windows", "2", "--batch-size", "2", "--out",
                 str(run), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "images-cpu model" in out and "4x4x3 images" in out and "bits/dim" in out
    assert json.loads((run / "config.json").read_text())["model"]["axial_pos_shape"] == [4, 4, 3]
    grid = tmp_path / "grid.png"
    assert main(["complete", "--checkpoint", str(run), "--n", "2", "--samples", "3",
                 "--keep-rows", "1", "--out", str(grid), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "bits/dim" in out and "s per completed image" in out
    from PIL import Image
    with Image.open(grid) as picture:  # 2 pictures x (original, fragment, 3 completions)
        assert picture.size == (5 * (16 + 2) + 2, 2 * (16 + 2) + 2)
    assert main(["eval", "--checkpoint", str(run), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.split()[:3] == ["hash", "rounds", "bits/dim"]
    assert main(["generate", "--checkpoint", str(run), "--device", "cpu"]) == 2
    assert "not a text model; use reformer complete" in capsys.readouterr().err
    assert main(["complete", "--checkpoint", str(run), "--n", "0", "--device", "cpu"]) == 2
    assert "--n 0 and --samples 2 must both be >= 1" in capsys.readouterr().err


def test_complete_needs_an_image_run(setup, capsys):
    assert main(train_args(setup)) == 0
    capsys.readouterr()
    assert main(["complete", "--checkpoint", str(setup / "run"), "--device", "cpu"]) == 2
    assert "complete needs a run trained with --task images" in capsys.readouterr().err


def test_synthetic_train_and_table_row(tmp_path, capsys):
    run = tmp_path / "syn"
    assert main(["synthetic", "train", "--attention", "lsh-2", "--word-length", "31",
                 "--chunk-length", "8", "--steps", "2", "--eval-every", "1",
                 "--eval-windows", "2", "--batch-size", "2", "--out", str(run),
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "bits/symbol" in out
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["attn_layers"] == ["lsh"] and config["model"]["n_hashes"] == 2
    assert config["training"]["seq_len"] == 64 and config["training"]["task"] == "synthetic"
    assert main(["synthetic", "eval", "--checkpoint", str(run), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["train", "\\", "eval", "full", "lsh-8", "lsh-4", "lsh-2",
                                "lsh-1"]
    assert lines[1].split()[0] == "lsh-2" and len(lines[1].split()) == 6
    assert main(["synthetic", "train", "--attention", "lsh-x", "--out", str(tmp_path / "x"),
                 "--device", "cpu"]) == 2
    assert "attention 'lsh-x' is unknown" in capsys.readouterr().err


def test_build_kernels_says_where_the_cache_is(capsys, monkeypatch, tmp_path):
    from reformer import _native

    if not _native.available():
        pytest.skip("the native kernels do not build here")
    assert main(["build-kernels"]) == 0
    assert f"cached in {_native.build_directory()}" in capsys.readouterr().out
    import torch.utils.cpp_extension as cpp

    def broken(**kwargs):
        raise RuntimeError("c++: not found\nmore detail")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp, "load", broken)
    assert main(["build-kernels"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("reformer build-kernels: error: the native CPU kernels did not "
                              "build (c++: not found)")


@pytest.mark.parametrize("preset, expect", [({}, "3000"), ({"GOMP_SPINCOUNT": "7"}, "7"),
                                            ({"OMP_WAIT_POLICY": "ACTIVE"}, None)])
def test_the_command_line_shortens_openmps_spin_wait_unless_told(preset, expect):
    """Set before PyTorch (and so libgomp) loads, unless the user chose a policy."""
    code = ("import os, sys; from reformer import cli; assert 'torch' not in sys.modules; "
            "cli._brief_spin_wait(); print(os.environ.get('GOMP_SPINCOUNT'))")
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], env={**env, **preset}, text=True,
                         capture_output=True, check=True).stdout.strip()
    assert out == str(expect)
