"""Byte corpora: path resolution, memory-mapped concatenation, splits, window sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reformer.data import text


@pytest.fixture
def files(tmp_path):
    """Three files, one of them empty, plus a hidden one, in a folder."""
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_bytes(b"first file\n")
    (d / "sub" / "b.txt").write_bytes("zweite Datei – ü".encode())
    (d / "c.txt").write_bytes(b"")
    (d / ".hidden").write_bytes(b"never read")
    return d


def test_resolve_paths_files_folders_globs(files):
    by_folder = text.resolve_paths([files])
    assert [p.name for p in by_folder] == ["a.txt", "c.txt", "b.txt"]  # sorted, hidden skipped
    assert text.resolve_paths([files / "a.txt"]) == [files / "a.txt"]
    assert [p.name for p in text.resolve_paths([str(files / "**" / "*.txt")])] == [
        "a.txt", "c.txt", "b.txt"]


@pytest.mark.parametrize("spec, message", [("missing.txt", "no such file"),
                                           ("*.nothing", "matches no files")])
def test_resolve_paths_errors(tmp_path, spec, message):
    with pytest.raises(ValueError, match=message):
        text.resolve_paths([str(tmp_path / spec)])


def test_corpus_is_the_memory_mapped_concatenation(files):
    paths = text.resolve_paths([files])
    corpus = text.ByteCorpus(paths)
    expected = b"\n".join(p.read_bytes() for p in paths if p.stat().st_size)
    assert len(corpus) == len(expected)
    assert bytes(corpus.read(0, len(corpus))) == expected
    assert bytes(corpus.read(5, 12)) == expected[5:17]  # across the file boundary
    assert all(isinstance(part, np.memmap) for part in corpus._parts if len(part) > 1)


def test_empty_data_is_an_error(tmp_path):
    (tmp_path / "e.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        text.ByteCorpus([tmp_path / "e.txt"])


def test_split_holds_out_the_tail(tmp_path):
    (tmp_path / "t.txt").write_bytes(bytes(range(200)))
    train, val = text.split(text.ByteCorpus([tmp_path / "t.txt"]), 0.1, min_val=30)
    assert (len(train), len(val)) == (170, 30)
    assert bytes(val.read(0, 30)) == bytes(range(170, 200))
    with pytest.raises(ValueError, match="too few"):
        text.split(text.ByteCorpus([tmp_path / "t.txt"]), 0.1, min_val=150)


def test_load_splits_with_separate_held_out_files(tmp_path):
    (tmp_path / "train.txt").write_bytes(b"x" * 100)
    (tmp_path / "val.txt").write_bytes(b"y" * 40)
    train, val, n = text.load_splits([tmp_path / "train.txt"], [tmp_path / "val.txt"],
                                     seq_len=16)
    assert (len(train), len(val), n) == (100, 40, 1)


def test_sampler_windows_come_from_the_span_and_replay_from_state(tmp_path):
    data = bytes(range(256)) * 4
    (tmp_path / "t.txt").write_bytes(data)
    span = text.ByteCorpus([tmp_path / "t.txt"]).span(100, 900)
    sampler = text.WindowSampler(span, 32, 3, seed=0)
    batch = sampler.next_batch()
    assert batch.shape == (3, 32) and batch.dtype == torch.long
    for row in batch.tolist():
        assert bytes(row) in data[100:900]
    state = sampler.state_dict()
    expected = [sampler.next_batch() for _ in range(3)]
    sampler = text.WindowSampler(span, 32, 3, seed=123)
    sampler.load_state_dict(state)
    assert all(torch.equal(sampler.next_batch(), e) for e in expected)


def test_evaluation_windows_are_fixed(tmp_path):
    (tmp_path / "t.txt").write_bytes(bytes(range(100)))
    span = text.ByteCorpus([tmp_path / "t.txt"]).span()
    w = span.windows(10, 4)
    assert w.shape == (4, 10) and w[0, 0] == 0 and w[-1, -1] == 99
    assert torch.equal(w, span.windows(10, 4))
    with pytest.raises(ValueError, match="fewer than"):
        span.windows(101, 1)


def test_encode_decode_round_trip():
    s = "Shall I compare thee – à un jour d'été?"
    assert text.decode(text.encode(s)) == s
