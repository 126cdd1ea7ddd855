"""``torchrun -m reformer train`` on two gloo processes against one process with the same
global batches: the same loss curve, one set of run files, a checkpoint that one process loads,
and exact resume after a signal to the launcher or a killed process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from reformer.cli import main as cli
from reformer.training import checkpoint as ckpt
from reformer.training.config import resolve_run_config
from reformer.training.trainer import Trainer

MODEL = dict(vocab_size=256, d_model=16, n_heads=2, d_ff=32, n_layers=2,
             attn_layers=["lsh", "local"], n_hashes=2, chunk_length=8, local_chunk_length=8,
             max_seq_len=32, hash_seed=0, init_std=0.1)
# A constant learning rate (min_lr_ratio 1, no warm-up), so that --steps may change on resume
# without changing the curve; evaluation at the start and the end only.
TRAINING = dict(min_lr_ratio=1.0, warmup_steps=0, lr=1e-2, eval_every=1000,
                checkpoint_every=1000, eval_windows=3, seed=0, device="cpu")
STEPS = 30  # room for the steps run while a signal reaches the processes


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("torchrun")
    text = tmp / "text.txt"
    words = torch.randint(0, 26, (6000,), generator=torch.Generator().manual_seed(0))
    text.write_text("".join(chr(97 + int(w)) + (" " if i % 5 == 4 else "")
                            for i, w in enumerate(words)))
    config = tmp / "tiny.json"
    config.write_text(json.dumps({"model": MODEL, "training": TRAINING}))
    return {"tmp": tmp, "flags": ["--config", str(config), "--data", str(text), "--seq-len",
                                  "32", "--grad-accum", "2"]}


def train_flags(setup: dict, out: Path, steps: int, batch: int, *extra: str) -> list[str]:
    return ["train", *setup["flags"], "--batch-size", str(batch), "--steps", str(steps),
            "--out", str(out), *extra]


def torchrun(args: list[str]) -> subprocess.Popen:
    """Two processes on this machine (the launcher picks a free port)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", "-m", "reformer", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=default_sigint)


def default_sigint() -> None:
    """In the child: SIGINT at its default (a shell's background job starts with it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def finish(proc: subprocess.Popen) -> str:
    out = proc.communicate()[0]
    assert proc.returncode == 0, out
    return out


def records(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / ckpt.METRICS_FILE
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def wait_for(condition, proc: subprocess.Popen) -> None:
    """Poll until ``condition()`` holds; fail if the process ends first."""
    while not condition():
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(setup) -> dict:
    """One process, batch 2 x 1: the global batches of two processes with batch 1."""
    out = setup["tmp"] / "one-process"
    assert cli(train_flags(setup, out, STEPS, 2)) == 0
    return {"loss": [r["loss"] for r in records(out, "train")],
            "val": [r["val_bpc"] for r in records(out, "eval")]}


def assert_same_curve(run_dir: Path, reference: dict) -> None:
    train = records(run_dir, "train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))  # once each: rank 0 writes
    torch.testing.assert_close(torch.tensor([r["loss"] for r in train], dtype=torch.float64),
                               torch.tensor(reference["loss"], dtype=torch.float64),
                               rtol=1e-5, atol=0)


def test_two_processes_train_like_one_with_the_same_global_batches(setup, reference):
    out = setup["tmp"] / "two"
    log = finish(torchrun(train_flags(setup, out, STEPS, 1)))
    assert "2 processes (ddp, cpu)" in log and log.count("validation bits/char") == 1
    assert_same_curve(out, reference)
    evals = records(out, "eval")  # held-out windows split 2 + 1 over the ranks, then reduced
    assert [r["step"] for r in evals] == [0, STEPS]
    torch.testing.assert_close(torch.tensor([r["val_bpc"] for r in evals]),
                               torch.tensor(reference["val"]), rtol=1e-6, atol=0)
    folders = [c.folder.name for c in ckpt.checkpoints(out)]
    assert folders == [f"step-{STEPS:08d}"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "config.json", "metrics.jsonl", "plot.png", f"step-{STEPS:08d}"]
    assert cli(["generate", "--checkpoint", str(out), "--prompt", "ab", "--max-new-tokens", "8",
                "--device", "cpu"]) == 0  # one process loads what two trained


def test_fsdp_trains_like_one_process(setup, reference):
    out = setup["tmp"] / "fsdp"
    finish(torchrun(train_flags(setup, out, STEPS, 1, "--parallel", "fsdp")))
    assert_same_curve(out, reference)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_sequence_parallel_trains_like_one_process_on_the_same_sequences(setup, tmp_path,
                                                                         dropout):
    # Both processes hold half of each window; the batches are the one-process ones, and
    # with dropout so are the masks (keyed by position, seeds from rank 0's RNG stream).
    one, two = tmp_path / "one", tmp_path / "two"
    config = tmp_path / "dropout.json"
    config.write_text(json.dumps({"model": {**MODEL, "dropout": dropout,
                                            "attention_dropout": dropout},
                                  "training": TRAINING}))
    flags = {**setup, "flags": [*setup["flags"], "--config", str(config)]}
    assert cli(train_flags(flags, one, 4, 1)) == 0
    log = finish(torchrun(train_flags(flags, two, 4, 1, "--sequence-parallel")))
    assert "2 processes (sequence, cpu)" in log
    for kind, key in (("train", "loss"), ("eval", "val_bpc")):
        torch.testing.assert_close(torch.tensor([r[key] for r in records(two, kind)]),
                                   torch.tensor([r[key] for r in records(one, kind)]),
                                   rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="cannot resume with 'ddp'"):
        Trainer.resume(two, changes={"steps": 5, "parallel": "ddp"})


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_launcher_saves_once_and_resume_continues_the_curve(setup, reference,
                                                                             sig):
    out = setup["tmp"] / f"signalled-{sig.name}"
    proc = torchrun(train_flags(setup, out, 100_000, 1))
    wait_for(lambda: len(records(out, "train")) >= 2, proc)
    proc.send_signal(sig)  # the launcher forwards it to every process
    log = proc.communicate()[0]
    stopped = records(out, "train")[-1]["step"]
    assert [c.step for c in ckpt.checkpoints(out)] == [stopped] and 2 <= stopped < STEPS, log
    state = torch.load(ckpt.latest_checkpoint(out).state, weights_only=True)
    assert state["world"] == 2 and len(state["rng"]["ranks"]) == 2
    assert not torch.equal(state["rng"]["ranks"][0]["torch"], state["rng"]["ranks"][1]["torch"])
    finish(torchrun(["train", "--out", str(out), "--resume", "--steps", str(STEPS)]))
    assert_same_curve(out, reference)


def test_a_killed_process_ends_the_job_and_resume_continues(setup, reference):
    out = setup["tmp"] / "killed"
    proc = torchrun(train_flags(setup, out, 100_000, 1, "--checkpoint-every", "2"))
    wait_for(lambda: ckpt.latest_checkpoint(out) is not None, proc)
    os.kill(worker_pid(proc.pid, rank=1), signal.SIGKILL)
    log = proc.communicate()[0]
    assert proc.returncode != 0, log
    saved = ckpt.latest_checkpoint(out).step
    assert 2 <= saved < STEPS, log
    finish(torchrun(["train", "--out", str(out), "--resume", "--steps", str(STEPS)]))
    assert_same_curve(out, reference)


def test_resuming_on_another_number_of_processes_is_refused(setup):
    out = setup["tmp"] / "refused"
    finish(torchrun(train_flags(setup, out, 2, 1)))
    with pytest.raises(ValueError, match="--nproc_per_node=2"):
        Trainer.resume(out, changes={"steps": 3})


def worker_pid(launcher: int, rank: int) -> int:
    """The pid of the launcher's worker process of ``rank`` (read from /proc)."""
    for child in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no worker of rank {rank} under pid {launcher}")


def test_plain_train_builds_no_process_group(setup, tmp_path):
    # Without torchrun's environment a run is one process, as before.
    run = resolve_run_config(None, setup["flags"][1], seq_len=32, steps=1,
                             data=(setup["flags"][3],))
    trainer = Trainer.create(tmp_path / "run", run)
    assert not trainer.world.distributed and trainer.model is trainer.module
    trainer.close()
    assert not torch.distributed.is_initialized()
