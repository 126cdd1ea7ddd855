"""The heads' tasks: labelled text (class folders, JSONL), ListOps batches and BERT-masked
text windows; padding, the held-out split, exact resume and data-parallel rows."""

from __future__ import annotations

import json

import pytest
import torch

from reformer.data import listops
from reformer.data.labelled import BUCKET_POOL, PAD_MULTIPLE, pad_examples
from reformer.data.masking import LISTOPS_MASK_TOKEN, MASK_TOKEN
from reformer.data.task import TaskSpec, build_task


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def jsonl(tmp_path):
    rows = [{"text": ("good " if i % 3 else "bad ") * (1 + i % 7), "label": "pos" if i % 3
             else "neg"} for i in range(60)]
    return write_jsonl(tmp_path / "reviews.jsonl", rows)


@pytest.fixture
def class_folders(tmp_path):
    root = tmp_path / "classes"
    for name, word in (("apples", b"apple "), ("pears", b"pear "), ("plums", b"plum ")):
        (root / name).mkdir(parents=True)
        for i in range(8):
            (root / name / f"{i}.txt").write_bytes(word * (i + 1))
    return root


def spec(task, data=(), **changes):
    return TaskSpec(**{"task": task, "data": tuple(str(d) for d in data), "seq_len": 256,
                       "batch_size": 4, "eval_windows": 5, **changes})


def test_pad_examples_pads_to_a_multiple_and_cuts_at_seq_len():
    examples = [(torch.arange(1, 4), 1), (torch.arange(1, 71), 0)]
    ids, mask, labels = pad_examples(examples, seq_len=1000)
    assert ids.shape == mask.shape == (2, 2 * PAD_MULTIPLE)
    assert mask.sum(dim=1).tolist() == [3, 70] and labels.tolist() == [1, 0]
    assert ids[0, :3].tolist() == [1, 2, 3] and not ids[0, 3:].any()
    ids, mask, _ = pad_examples(examples, seq_len=50)
    assert ids.shape == (2, 50) and mask[1].all() and ids[1, -1] == 50


def test_classify_reads_class_folders(class_folders):
    task = build_task(spec("classify", [class_folders], val_fraction=0.25))
    assert task.classes == ["apples", "pears", "plums"] and task.n_classes == 3
    assert task.n_train + task.n_held_out == 24 and task.n_held_out == 6
    ids, mask, labels = task.next_batch()
    assert ids.shape[0] == 4 and mask.dtype == torch.bool and labels.max() < 3
    for row, label in zip(ids, labels, strict=True):  # the text names its class
        word = bytes(row[row != 0].tolist()).decode().split()[0]
        assert task.classes[label].startswith(word)


def test_classify_reads_jsonl_and_a_given_validation_file(jsonl, tmp_path):
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "bad", "label": "neg"},
                                               {"text": "good", "label": "pos"}])
    task = build_task(spec("classify", [jsonl], val_data=(str(val),)))
    assert task.classes == ["neg", "pos"] and task.n_train == 60 and task.n_held_out == 2
    ids, mask, labels = task.eval_set()
    assert labels.tolist() == [0, 1] and mask.sum().item() == 7
    # the split without --val-data does not depend on the run's seed
    a = build_task(spec("classify", [jsonl], seed=1)).eval_set()
    b = build_task(spec("classify", [jsonl], seed=2)).eval_set()
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("rows, match", [
    ([{"text": "a", "label": "x"}] * 5, "at least 2"),
    (["not an object"], r"reviews.jsonl:1 .*\"text\" and \"label\""),
    ([{"text": "", "label": "x"}], r"reviews.jsonl:1: \"text\" must be a non-empty string"),
])
def test_classify_refuses_bad_data(tmp_path, rows, match):
    path = write_jsonl(tmp_path / "reviews.jsonl", rows)
    with pytest.raises(ValueError, match=match):
        build_task(spec("classify", [path], val_data=(str(path),)))


def test_classify_refuses_missing_data_and_unknown_held_out_labels(jsonl, tmp_path):
    with pytest.raises(ValueError, match="no default data; pass --data"):
        build_task(spec("classify"))
    with pytest.raises(ValueError, match="neither a folder of class folders nor a .jsonl"):
        build_task(spec("classify", [tmp_path / "nothing.txt"]))
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "meh", "label": "neutral"}])
    with pytest.raises(ValueError, match=r"held-out labels \['neutral'\]"):
        build_task(spec("classify", [jsonl], val_data=(str(val),)))


@pytest.mark.parametrize("task", ["classify", "listops", "mlm", "listops-mlm"])
def test_sampler_state_replays_batches(task, jsonl):
    made = build_task(spec(task, [jsonl] if task == "classify" else (), seq_len=2048))
    state = made.state_dict()
    first = made.next_batch()
    made.load_state_dict(state)
    again = made.next_batch()
    assert all(x is y is None or torch.equal(x, y) for x, y in zip(first, again, strict=True))


def test_a_pool_of_batches_is_grouped_by_length():
    task = build_task(spec("listops", seq_len=2048, batch_size=4))
    batches = [task.next_batch() for _ in range(BUCKET_POOL)]
    spans = sorted((int(m.sum(1).min()), int(m.sum(1).max())) for _, m, _ in batches)
    for (_, longest), (shortest, _) in zip(spans, spans[1:], strict=False):
        assert longest <= shortest  # the batches' length ranges do not overlap
    drawn = torch.randint(0, task.n_train, (BUCKET_POOL * 4,),
                          generator=torch.Generator().manual_seed(task.spec.seed))
    served = sorted(int(n) for _, m, _ in batches for n in m.sum(1))
    made = sorted(min(len(task.train_example(int(i))[0]), 2048) for i in drawn)
    assert served == made  # every drawn example is served once
    assert spans[-1][1] - spans[0][0] > 0  # (the pool's lengths differ: the test can fail)


@pytest.mark.parametrize("task", ["classify", "listops", "listops-mlm"])
def test_resume_inside_a_pool_serves_the_same_batches(task, jsonl):
    made = build_task(spec(task, [jsonl] if task == "classify" else (), seq_len=2048))
    for _ in range(3):
        made.next_batch()
    state = made.state_dict()
    want = [made.next_batch() for _ in range(BUCKET_POOL)]  # crosses into the next pool
    resumed = build_task(spec(task, [jsonl] if task == "classify" else (), seq_len=2048))
    resumed.load_state_dict(state)
    for batch, again in zip(want, [resumed.next_batch() for _ in range(BUCKET_POOL)],
                            strict=True):
        assert all(torch.equal(x, y) for x, y in zip(batch, again, strict=True))


@pytest.mark.parametrize("task", ["classify", "listops", "mlm", "listops-mlm"])
def test_ranks_rows_make_the_one_process_batch(task, jsonl):
    data = [jsonl] if task == "classify" else ()
    whole = build_task(spec(task, data, seq_len=2048, batch_size=4)).next_batch()
    parts = [build_task(spec(task, data, seq_len=2048, batch_size=2, rank=r, world=2)
                        ).next_batch() for r in range(2)]
    for i, full in enumerate(whole):
        for rank, part in enumerate(parts):
            if full is None:
                assert part[i] is None
                continue
            rows = full[2 * rank:2 * rank + 2]
            if rows.dim() == 2:  # each rank pads to its own longest example
                pad = -100 if i == 2 else 0  # masked-LM labels mark padding "no loss"
                assert (rows[:, part[i].shape[1]:] == pad).all()
                rows = rows[:, :part[i].shape[1]]
            assert torch.equal(part[i], rows)


def test_listops_batches_hold_examples_with_their_values():
    task = build_task(spec("listops", seq_len=2048))
    ids, mask, labels = task.next_batch()
    for row, m, label in zip(ids, mask, labels, strict=True):
        symbols = [listops.VOCAB[i] for i in row[m].tolist()]
        assert listops.evaluate(listops.parse(symbols)) == label
    test = task.test_set(3)
    val = task.eval_set()
    assert not torch.equal(test[0][:, :500], val[0][:3, :500])  # different splits


def test_mlm_masks_fifteen_percent_and_labels_only_those():
    task = build_task(spec("mlm", seq_len=1024, batch_size=8))
    assert task.vocab_size == MASK_TOKEN + 1
    inputs, mask, labels = task.next_batch()
    assert mask is None and inputs.shape == labels.shape == (8, 1024)
    chosen = labels != -100
    assert 0.12 < chosen.float().mean() < 0.18
    assert (inputs[chosen] == MASK_TOKEN).float().mean() > 0.7
    assert (inputs[~chosen] < 256).all()
    val_a, val_b = task.eval_set(), build_task(spec("mlm", seq_len=1024, seed=5)).eval_set()
    assert torch.equal(val_a[0], val_b[0]) and torch.equal(val_a[2], val_b[2])


def test_listops_mlm_masks_the_listops_inputs_and_labels_only_real_tokens():
    masked = build_task(spec("listops-mlm", seq_len=2048, batch_size=8))
    plain = build_task(spec("listops", seq_len=2048, batch_size=8))
    assert masked.vocab_size == LISTOPS_MASK_TOKEN + 1 == len(listops.VOCAB) + 1
    inputs, mask, labels = masked.next_batch()
    ids, same_mask, _ = plain.next_batch()  # the same examples in the same order
    assert torch.equal(mask, same_mask) and inputs.shape == labels.shape == ids.shape
    chosen = labels != -100
    assert not chosen[~mask].any() and not inputs[~mask].any()  # padding stays padding
    assert 0.12 < chosen.sum() / mask.sum() < 0.18
    assert torch.equal(labels[chosen], ids[chosen])  # the labels are the original symbols
    assert torch.equal(inputs[~chosen], ids[~chosen])
    assert (inputs[chosen] == LISTOPS_MASK_TOKEN).float().mean() > 0.7
    assert (inputs[~chosen] < LISTOPS_MASK_TOKEN).all()
    assert (inputs[mask] != 0).all()  # no real token is replaced by padding
    val_a = masked.eval_set()
    val_b = build_task(spec("listops-mlm", seq_len=2048, seed=5)).eval_set()
    assert all(torch.equal(a, b) for a, b in zip(val_a, val_b, strict=True))
    assert (val_a[2] != -100).any()


def test_listops_mlm_test_split_masks_the_listops_test_inputs_whatever_the_seed():
    masked = build_task(spec("listops-mlm", seq_len=2048))
    ids, mask, _ = build_task(spec("listops", seq_len=2048)).test_set(4)
    inputs, same_mask, labels = masked.test_set(4)
    chosen = labels != -100
    assert torch.equal(mask, same_mask) and chosen.any() and not chosen[~mask].any()
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    again = build_task(spec("listops-mlm", seq_len=2048, seed=5)).test_set(4)
    assert all(torch.equal(a, b) for a, b in zip((inputs, mask, labels), again, strict=True))
