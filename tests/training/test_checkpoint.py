"""Run directories: a kill at any point of a save, the old layout, the lock, folders that are not
runs, truncated files, and a diverging loss.

A kill is simulated by a fault injected at the k-th file-system call of a save, for every k:
the call raises ``Killed`` (a BaseException, so no ``except Exception`` can run clean-up that a
kill -9 would not), and a faulted ``os.write`` first writes half its bytes (a torn write).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reformer import ReformerConfig
from reformer.cli import main
from reformer.training import checkpoint as ckpt
from reformer.training import trainer as trainer_module
from reformer.training.config import RunConfig, TrainConfig
from reformer.training.metrics import MetricsLog
from reformer.training.trainer import Callback, Trainer

MODEL = ReformerConfig(vocab_size=256, d_model=16, n_heads=2, d_ff=32, n_layers=2,
                       attn_layers=("local", "lsh"), n_hashes=2, chunk_length=16,
                       local_chunk_length=16, max_seq_len=64, dropout=0.1)
FS_CALLS = ("open", "write", "fsync", "mkdir", "rename", "replace", "unlink", "rmdir")


def make_run(corpus: Path, **changes) -> RunConfig:
    train = dict(data=(str(corpus),), seq_len=64, batch_size=1, grad_accum=1, steps=6,
                 warmup_steps=2, eval_every=100, eval_windows=1, checkpoint_every=100, seed=3,
                 device="cpu")
    return RunConfig(MODEL, TrainConfig(**{**train, **changes}), preset=None)


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in MetricsLog(run_dir / ckpt.METRICS_FILE).read()
            if r["kind"] == "train"]


class StopAt(Callback):
    """Stops the loop after ``step``, first calling ``then`` (e.g. to arm a fault)."""

    def __init__(self, step: int, then=lambda trainer: None) -> None:
        self.step, self.then = step, then

    def on_step(self, trainer, report):
        if report.step == self.step:
            trainer.request_stop("test")
            self.then(trainer)


class Killed(BaseException):
    pass


class FaultAt:
    """While armed, counts file-system calls; the k-th raises Killed (k=None: count only)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, k: int | None) -> None:
        self.k, self.calls, self.armed = k, 0, False
        for name in FS_CALLS:
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))

    def _wrap(self, name, real):
        def call(*args, **kwargs):
            if self.armed:
                self.calls += 1
                if self.calls == self.k:
                    if name == "write":  # a torn write: half the bytes reach the file
                        real(args[0], bytes(args[1])[:len(args[1]) // 2])
                    raise Killed(f"os.{name}, file-system call {self.k} of the save")
            return real(*args, **kwargs)
        return call


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_bytes(b"To be, or not to be, that is the question. " * 40)
    return path


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> list[float]:
    """The losses of the uninterrupted 6-step run."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    Trainer.create(run_dir, make_run(corpus)).run_loop()
    return train_losses(run_dir)


def to_old_layout(run_dir: Path) -> None:
    """Turn the newest checkpoint into the layout before step folders (files at the top)."""
    folder = ckpt.latest_checkpoint(run_dir).folder
    for name in (ckpt.WEIGHTS_FILE, ckpt.STATE_FILE):
        (folder / name).rename(run_dir / name)
    folder.rmdir()


def saved_at_step_3(corpus: Path, run_dir: Path, layout: str) -> Path:
    Trainer.create(run_dir, make_run(corpus)).run_loop(StopAt(3))
    if layout == "old":
        to_old_layout(run_dir)
    return run_dir


def crash_saving_step_4(template: Path, run_dir: Path, k: int | None) -> int:
    """Resume a copy of ``template`` (saved at step 3), train step 4 and save it with a fault
    at call k; returns how many calls the save made (up to the fault)."""
    shutil.copytree(template, run_dir)
    with pytest.MonkeyPatch.context() as mp:
        fault = FaultAt(mp, k)
        trainer = Trainer.resume(run_dir)
        try:
            trainer.run_loop(StopAt(4, then=lambda t: setattr(fault, "armed", True)))
        except Killed:
            pass
        assert (fault.calls == k) == (k is not None), f"no fault at call {k}"
        return fault.calls


@pytest.mark.parametrize("layout", ["steps", "old"])
def test_a_kill_at_any_point_of_a_save_leaves_a_checkpoint_that_resumes_exactly(
        tmp_path, corpus, reference, layout, monkeypatch):
    monkeypatch.setattr(trainer_module, "plot_metrics", lambda *args, **kwargs: None)  # speed
    template = saved_at_step_3(corpus, tmp_path / "template", layout)
    n_calls = crash_saving_step_4(template, tmp_path / "clean", None)
    assert n_calls >= 8
    resumed_at = []
    for k in range(1, n_calls + 1):
        run_dir = tmp_path / f"killed-at-{k}"
        crash_saving_step_4(template, run_dir, k)
        trainer = Trainer.resume(run_dir)
        resumed_at.append(trainer.step)
        assert not [p for p in run_dir.iterdir() if p.name.startswith(ckpt.TMP_PREFIX)]
        assert trainer.run_loop().step == 6
        assert train_losses(run_dir) == reference, f"killed at call {k}"
        assert sorted(p.name for p in run_dir.iterdir()) == sorted(
            [ckpt.CONFIG_FILE, ckpt.METRICS_FILE, ckpt.LOCK_FILE, "step-00000006"])
    assert set(resumed_at) == {3, 4}  # kills before the switch and after it


def test_the_old_layout_still_loads_and_resumes(tmp_path, corpus, reference):
    run_dir = saved_at_step_3(corpus, tmp_path / "r", "steps")
    saved = ckpt.load_model(run_dir)[0].state_dict()
    to_old_layout(run_dir)
    assert ckpt.has_checkpoint(run_dir)
    assert ckpt.latest_checkpoint(run_dir) == ckpt.Checkpoint(run_dir, 3)
    loaded = ckpt.load_model(run_dir)[0].state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert Trainer.resume(run_dir).run_loop().step == 6
    assert train_losses(run_dir) == reference
    assert not (run_dir / ckpt.WEIGHTS_FILE).exists() and not (run_dir / ckpt.STATE_FILE).exists()


def test_a_torn_pair_in_the_old_layout_is_refused(tmp_path, corpus):
    run_dir = saved_at_step_3(corpus, tmp_path / "r", "old")
    state = torch.load(run_dir / ckpt.STATE_FILE, weights_only=True)
    torch.save({**state, "step": 2}, run_dir / ckpt.STATE_FILE)
    with pytest.raises(ValueError, match="from step 3 but trainer_state.pt from step 2"):
        Trainer.resume(run_dir)


def test_saving_a_step_again_keeps_one_checkpoint_and_loads_the_newest(tmp_path, corpus):
    trainer = Trainer.create(tmp_path / "r", make_run(corpus))
    for elapsed, name in [(1.0, "step-00000000"), (2.0, "step-00000000.1"),
                          (3.0, "step-00000000.2")]:
        trainer.elapsed_s = elapsed
        trainer.save_checkpoint()
        assert [c.folder.name for c in ckpt.checkpoints(tmp_path / "r")] == [name]
    trainer.close()
    assert Trainer.resume(tmp_path / "r").elapsed_s == 3.0


def test_a_second_run_in_the_same_folder_is_refused_until_the_first_ends(tmp_path, corpus):
    run = make_run(corpus, steps=2)
    first = Trainer.create(tmp_path / "r", run)
    holder = f"pid {os.getpid()} on {socket.gethostname()}"
    with pytest.raises(ValueError, match=f"in use by another training run \\({holder}") as err:
        Trainer.create(tmp_path / "r", run)
    assert "\n" not in str(err.value) and "choose another output folder" in str(err.value)

    class TryASecondRun(Callback):
        def on_step(self, trainer, report):
            with pytest.raises(ValueError, match="in use by another training run"):
                Trainer.create(tmp_path / "r", run)

    first.run_loop(TryASecondRun())
    assert Trainer.resume(tmp_path / "r").step == 2  # run_loop has unlocked it


def test_the_lock_of_a_killed_process_is_released(tmp_path, corpus):
    run_dir = tmp_path / "r"
    code = ("import sys; from pathlib import Path; from reformer.training.rundir import "
            "RunLock; lock = RunLock(Path(sys.argv[1])); lock.acquire(); print('locked', "
            "flush=True); "
            "sys.stdin.read()")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == "locked\n"  # waits until the lock is held
        with pytest.raises(ValueError, match=f"pid {proc.pid} on {socket.gethostname()}"):
            Trainer.create(run_dir, make_run(corpus))
    finally:
        proc.kill()
        proc.wait()
    Trainer.create(run_dir, make_run(corpus)).close()


def test_a_folder_of_other_files_is_refused_and_left_untouched(tmp_path, corpus):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    (pictures / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ValueError, match=r"pictures is not empty \(holiday.jpg\) and is not a "
                                         "run directory.*choose a new or empty folder"):
        Trainer.create(pictures, make_run(corpus))
    assert [p.name for p in pictures.iterdir()] == ["holiday.jpg"]
    (tmp_path / "empty").mkdir()
    Trainer.create(tmp_path / "empty", make_run(corpus)).close()  # an empty folder is fine
    with pytest.raises(ValueError, match="is a file, not a folder"):
        Trainer.create(pictures / "holiday.jpg", make_run(corpus))


@pytest.fixture
def two_checkpoints(tmp_path, corpus) -> tuple[Path, Path]:
    """A run at step 2 that also kept step 1 (a kill came between the switch and the delete)."""
    run_dir = tmp_path / "r"
    Trainer.create(run_dir, make_run(corpus)).run_loop(StopAt(1))
    kept = shutil.copytree(run_dir / "step-00000001", tmp_path / "kept")
    Trainer.resume(run_dir).run_loop(StopAt(2))
    shutil.copytree(kept, run_dir / "step-00000001")
    return run_dir, run_dir / "step-00000002"


@pytest.mark.parametrize("name", [ckpt.WEIGHTS_FILE, ckpt.STATE_FILE])
@pytest.mark.parametrize("keep", [0, 7, 100, 0.5, -1])
def test_a_truncated_checkpoint_file_is_one_clean_error(two_checkpoints, name, keep, capsys):
    run_dir, newest = two_checkpoints
    path = newest / name
    data = path.read_bytes()
    path.write_bytes(data[:int(keep * len(data)) if isinstance(keep, float) else keep])
    message = (f"{path} is truncated or damaged .*; delete {newest} to fall back to the "
               "checkpoint of step 1")
    with pytest.raises(ValueError, match=message):
        Trainer.resume(run_dir)
    if name == ckpt.WEIGHTS_FILE:
        with pytest.raises(ValueError, match=message):
            ckpt.load_model(run_dir)
        for command in (["eval"], ["generate", "--max-new-tokens", "1"]):
            assert main([*command, "--checkpoint", str(run_dir), "--device", "cpu"]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "truncated or damaged" in err, err
    shutil.rmtree(newest)  # what the message says to do
    assert Trainer.resume(run_dir).step == 1


def test_with_no_earlier_checkpoint_the_error_says_to_start_anew(tmp_path, corpus):
    Trainer.create(tmp_path / "r", make_run(corpus)).run_loop(StopAt(1))
    path = ckpt.latest_checkpoint(tmp_path / "r").weights
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="no earlier checkpoint is kept: .*train a new run"):
        ckpt.load_model(tmp_path / "r")


class Poison(Callback):
    """Makes every weight NaN after step ``step`` (or after the first checkpoint: step None)."""

    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_step(self, trainer, report):
        if report.step == self.step:
            self.poison(trainer)

    def on_checkpoint(self, trainer, reason):
        if self.step is None:
            self.poison(trainer)

    @staticmethod
    def poison(trainer: Trainer) -> None:
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.fill_(float("nan"))


def test_a_diverging_loss_says_whether_a_checkpoint_exists(tmp_path, corpus):
    with pytest.raises(ValueError, match=r"the loss became nan at step 2; lower the learning "
                                         r"rate \(lr=0.003\); no checkpoint has been saved yet"):
        Trainer.create(tmp_path / "a", make_run(corpus)).run_loop(Poison(1))
    assert not ckpt.has_checkpoint(tmp_path / "a")
    with pytest.raises(ValueError, match=f"at step 3; .*the checkpoint of step 2 in "
                                         f"{tmp_path / 'b'} is intact"):
        Trainer.create(tmp_path / "b", make_run(corpus, checkpoint_every=2)).run_loop(Poison(None))
    assert Trainer.resume(tmp_path / "b").step == 2  # true, and the lock was released
