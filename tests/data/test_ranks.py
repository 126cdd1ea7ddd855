"""Data-parallel sampling: each rank's rows of one global micro-batch (reformer.data.task).

For every task: the ranks' batches concatenated equal a one-process task's batch of
``world * B``; world = 1 reproduces the sampling of before ranks existed (so old checkpoints
resume identically); each rank reads or decodes only its own rows. Also: a bad rank or world
is refused, and reformer.data imports nothing from reformer.training.
"""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import reformer.data
from reformer.data import images, synthetic, text
from reformer.data.task import TaskSpec, build_task

B, SEED, STEPS = 3, 7, 3


@pytest.fixture
def text_spec(tmp_path):
    (tmp_path / "t.txt").write_bytes(bytes(range(256)) * 8)  # 2048 bytes
    return TaskSpec(task="text", data=(str(tmp_path / "t.txt"),), val_fraction=0.1, seq_len=16,
                    batch_size=B, eval_windows=2, seed=SEED)


@pytest.fixture
def images_spec(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):  # 6 for training, 2 held out; noise, so every picture differs
        Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).save(folder / f"{i}.png")
    return TaskSpec(task="images", data=(str(folder),), val_fraction=0.25, seq_len=16,
                    image_size=4, image_channels=1, batch_size=B, eval_windows=2, seed=SEED)


@pytest.fixture
def synthetic_spec():
    return TaskSpec(task="synthetic", seq_len=12, batch_size=B, eval_windows=2, seed=SEED)


@pytest.fixture(params=["text", "images", "synthetic"])
def spec(request):
    return request.getfixturevalue(f"{request.param}_spec")


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_concatenated_are_the_one_process_batch(spec, world):
    whole = build_task(replace(spec, batch_size=world * B))
    ranks = [build_task(replace(spec, rank=r, world=world)) for r in range(world)]
    for _ in range(STEPS):
        parts = [task.next_batch() for task in ranks]
        assert all(x.shape == (B, spec.seq_len) for x, _ in parts)
        inputs, labels = whole.next_batch()
        assert torch.equal(torch.cat([x for x, _ in parts]), inputs)
        assert torch.equal(torch.cat([y for _, y in parts]), labels)
        states = [task.state_dict()["generator"] for task in [whole, *ranks]]
        assert all(torch.equal(s, states[0]) for s in states[1:])
    assert not torch.equal(parts[0][0], parts[1][0])  # the ranks do see different rows
    for task in ranks:  # the held-out set and the fingerprint are the whole run's
        assert torch.equal(task.eval_set()[0], whole.eval_set()[0])
        assert task.fingerprint() == whole.fingerprint()


def old_text_batches(spec):
    """The one-process sampling before ranks: B starts per batch, one generator."""
    task = build_task(spec)
    generator = torch.Generator().manual_seed(spec.seed)
    high = len(task.train_text) - spec.seq_len + 1
    for _ in range(STEPS):
        starts = torch.randint(0, high, (spec.batch_size,), generator=generator)
        yield torch.stack([text.to_ids(task.train_text.read(s, spec.seq_len))
                           for s in starts.tolist()])


def old_image_batches(spec):
    train = images.load_image_splits(spec)[0]
    generator = torch.Generator().manual_seed(spec.seed)
    for _ in range(STEPS):
        picks = torch.randint(0, len(train), (spec.batch_size,), generator=generator)
        yield torch.stack([images.image_to_tokens(train[i]) for i in picks.tolist()])


def old_synthetic_batches(spec):
    generator = torch.Generator().manual_seed(spec.seed)
    for _ in range(STEPS):
        yield synthetic.duplication_batch(spec.batch_size, spec.seq_len // 2 - 1, generator)


def test_one_process_batches_are_those_of_before(spec):
    old = {"text": old_text_batches, "images": old_image_batches,
           "synthetic": old_synthetic_batches}[spec.task]
    task = build_task(spec)
    for expected in old(spec):
        assert torch.equal(task.next_batch()[0], expected)


def test_a_rank_reads_only_its_own_windows_and_pictures(text_spec, images_spec, monkeypatch):
    reads = []
    read = text.TextSpan.read
    monkeypatch.setattr(text.TextSpan, "read", lambda self, *a: reads.append(a) or read(self, *a))
    task = build_task(replace(text_spec, rank=1, world=4))
    reads.clear()  # the held-out windows, read once when the task is built
    task.next_batch()
    assert len(reads) == B

    decoded = []
    get = images.ImageFiles.__getitem__
    monkeypatch.setattr(images.ImageFiles, "__getitem__",
                        lambda self, i: decoded.append(i) or get(self, i))
    task = build_task(replace(images_spec, rank=1, world=4))
    decoded.clear()
    task.next_batch()
    assert len(decoded) == B


@pytest.mark.parametrize(("rank", "world", "message"), [
    (0, 0, "world=0 must be an integer >= 1"), (2, 2, "rank=2 must be an integer with 0 <="),
    (-1, 2, "rank=-1"), (0, 1.0, "world=1.0"), (True, 2, "rank=True")])
def test_bad_rank_or_world_is_refused(rank, world, message):
    with pytest.raises(ValueError, match=message):
        TaskSpec(rank=rank, world=world)


# ------------------------------------------------------------- data/ never imports training
def training_imports(source: str, package: str = "reformer.data") -> list[str]:
    """The modules under reformer.training that ``source`` (a module of ``package``) imports."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            module = ".".join(base + [node.module] if node.level else [node.module or ""])
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [n for n in names if n == "reformer.training" or
                  n.startswith("reformer.training.")]
    return found


def test_the_import_check_can_fail():
    assert training_imports("from reformer.training.config import TrainConfig")
    assert training_imports("if TYPE_CHECKING:\n    import reformer.training.config")
    assert training_imports("from reformer import training")
    assert training_imports("from ..training import config")
    assert not training_imports("from reformer.data.task import Task\nimport torch")


def test_data_modules_import_nothing_from_training():
    folder = Path(reformer.data.__file__).parent
    sources = sorted(folder.glob("*.py"))
    assert len(sources) >= 5
    offending = {p.name: training_imports(p.read_text(encoding="utf-8")) for p in sources}
    assert not any(offending.values()), offending
