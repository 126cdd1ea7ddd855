"""Batched sampling (issue 24 item 5): several prompts of different lengths, several samples of
each, in one batch per decoding length -- the tokens of one-at-a-time sampling with the same
seeds, with and without the cache, through cache restarts, and from the command line."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from conftest import train_text_run
from reformer import ReformerConfig
from reformer import generation as generation_module
from reformer.cli import main
from reformer.cli.sample import decode_bytes
from reformer.data import text
from reformer.generation import sample, sample_batch
from reformer.training import checkpoint as ckpt

LENGTHS = (3, 9, 14)  # three decoding lengths: three batches of two
FILTERS = [{}, dict(temperature=0.7, top_k=5), dict(temperature=1.5, top_p=0.8)]


def prompts_of(ids, lengths=LENGTHS) -> list[torch.Tensor]:
    return [ids(1, length, seed=length)[0] for length in lengths]


def one_at_a_time(model, prompts, max_new_tokens, n_per_prompt=2, seed=0, **kwargs):
    """The reference: each sequence alone, called as generation.py's docstring says."""
    out = []
    for i, prompt in enumerate(prompts):
        for j in range(n_per_prompt):
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed + i * n_per_prompt + j)
            out.append(list(sample(model, prompt, max_new_tokens, generator=generator,
                                   **kwargs)))
    return out


def record_batch_sizes(model, monkeypatch) -> dict[str, list[int]]:
    """The batch size of every prefill and step call of ``model``, as they happen."""
    seen = {"prefill": [], "step": []}
    for name in seen:
        original = getattr(model, name)

        def record(ids, caches, _original=original, _name=name):
            seen[_name].append(ids.shape[0])
            return _original(ids, caches)

        monkeypatch.setattr(model, name, record)
    return seen


@pytest.mark.parametrize("hash_seed", [0, None])
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("filters", FILTERS)
def test_batched_tokens_equal_one_at_a_time(make_model, ids, hash_seed, use_cache, filters):
    model = make_model(hash_seed=hash_seed)  # lsh, local and full layers, float64
    prompts = prompts_of(ids)
    batched = sample_batch(model, prompts, 20, n_per_prompt=2, seed=7, use_cache=use_cache,
                           **filters)
    assert batched == one_at_a_time(model, prompts, 20, seed=7, use_cache=use_cache, **filters)
    assert [len(t) for t in batched] == [20] * 6
    for i in range(3):  # distinct seeds: a batch that shared one generator would fail above
        assert batched[2 * i] != batched[2 * i + 1]


def test_each_decoding_length_is_one_batch_with_one_step_per_token(make_model, ids,
                                                                  monkeypatch):
    model = make_model()
    prompts = prompts_of(ids, (5, 3, 5))  # the two of length 5 decode together
    seen = record_batch_sizes(model, monkeypatch)
    sample_batch(model, prompts, 6, n_per_prompt=2)
    assert seen == {"prefill": [4, 2], "step": [4] * 5 + [2] * 5}


@pytest.mark.parametrize("use_cache", [True, False])
def test_context_limit_and_restarts_match_one_at_a_time(make_model, ids, monkeypatch,
                                                        use_cache):
    # hash_seed None: each restart draws new rotations from the global RNG, in both paths
    model = make_model(hash_seed=None)
    prompts = prompts_of(ids, (3, 7, 20))  # context 8: 7 and 20 both prefill 7 tokens
    seen = record_batch_sizes(model, monkeypatch)
    batched = sample_batch(model, prompts, 25, n_per_prompt=2, context=8, seed=3,
                           use_cache=use_cache, top_k=8)
    if use_cache:  # two batches (4 rows, 2 rows), each restarted when its cache filled up
        assert sorted(set(seen["prefill"])) == [2, 4] and len(seen["prefill"]) > 2
        assert seen["prefill"].count(4) + seen["step"].count(4) == 25
        assert seen["prefill"].count(2) + seen["step"].count(2) == 25
    else:
        assert seen == {"prefill": [], "step": []}
    assert batched == one_at_a_time(model, prompts, 25, seed=3, context=8,
                                    use_cache=use_cache, top_k=8)


def test_comparison_detects_unseeded_rotations(make_model, ids, monkeypatch):
    # Guard on the tests above: without the global seed before each batch, a model without
    # hash_seed hashes with other rotations than one-at-a-time sampling, and tokens differ.
    model = make_model(hash_seed=None)
    prompts = prompts_of(ids)
    reference = one_at_a_time(model, prompts, 20, seed=7)
    monkeypatch.setattr(generation_module, "_global_rng_seeded",
                        lambda seed, device: contextlib.nullcontext())
    torch.manual_seed(12345)
    assert sample_batch(model, prompts, 20, n_per_prompt=2, seed=7) != reference


def test_one_prompt_one_sample_is_sample(make_model, ids):
    model = make_model(hash_seed=None)
    prompt = ids(1, 10)[0]
    torch.manual_seed(4)
    alone = list(sample(model, prompt, 15, generator=torch.Generator().manual_seed(4)))
    assert sample_batch(model, [prompt], 15, seed=4) == [alone]
    assert sample_batch(model, [prompt.tolist()], 15, seed=4) == [alone]  # lists work too


def test_leaves_the_global_rng_and_the_training_mode_alone(make_model, ids):
    model = make_model(hash_seed=None)
    torch.manual_seed(99)
    state = torch.get_rng_state()
    assert sample_batch(model, prompts_of(ids), 3, n_per_prompt=2, seed=1)
    assert torch.equal(torch.get_rng_state(), state) and model.training
    assert sample_batch(model, prompts_of(ids), 0, n_per_prompt=2) == [[]] * 6


@pytest.mark.parametrize("prompts, kwargs, named", [
    ([], {}, "prompts is empty"),
    (None, dict(n_per_prompt=0), "n_per_prompt=0"),
    (None, dict(n_per_prompt=True), "n_per_prompt=True"),
    (None, dict(n_per_prompt=1.5), "n_per_prompt=1.5"),
    (None, dict(seed=0.5), "seed=0.5"),
    ([torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)], {},
     r"prompts\[1\] has shape \(0,\)"),
    ([torch.ones(2, 3, dtype=torch.long)], {}, r"prompts\[0\] has shape \(2, 3\)"),
    (None, dict(max_new_tokens=-1), "max_new_tokens=-1"),
    (None, dict(temperature=0), "temperature=0"),
    (None, dict(top_p=2.0), "top_p=2"),
    (None, dict(context=1), "context=1"),
])
def test_bad_inputs_raise_value_errors_naming_the_value(make_model, prompts, kwargs, named):
    model = make_model()
    prompts = [torch.tensor([1, 2, 3])] if prompts is None else prompts
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=named):
        sample_batch(model, prompts, **kwargs)


# ----------------------------------------------------------------------------- command line
TEXT_MODEL = ReformerConfig(vocab_size=256, d_model=16, n_heads=2, d_ff=32, n_layers=2,
                            attn_layers=("local", "lsh"), n_hashes=2, chunk_length=4,
                            local_chunk_length=4, max_seq_len=64)  # no hash_seed


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> Path:
    return train_text_run(tmp_path_factory.mktemp("text"), TEXT_MODEL)


def generate(capsys, run: Path, *flags: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["generate", "--checkpoint", str(run), "--device", "cpu", "--max-new-tokens",
                 "16", "--top-k", "5", "--seed", "3", *flags])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_samples_n_continuations_of_several_prompts(text_run, capsys):
    prompts = ["Now is", "The winter of our"]
    code, out, _ = generate(capsys, text_run, "--prompt", prompts[0], "--prompt", prompts[1],
                            "--n", "2")
    assert code == 0
    lines = out.splitlines()
    headers = [line for line in lines if line.startswith("--- prompt")]
    assert headers == ["--- prompt 1/2, sample 1/2 ---", "--- prompt 1/2, sample 2/2 ---",
                       "--- prompt 2/2, sample 1/2 ---", "--- prompt 2/2, sample 2/2 ---"]
    bodies = out.split("\n--- prompt ")
    bodies = [b.split(" ---\n", 1)[1].removesuffix("\n") for b in bodies]

    model, _ = ckpt.load_model(text_run, torch.device("cpu"))
    encoded = [text.encode(p) for p in prompts]
    expected = one_at_a_time(model, encoded, 16, seed=3, temperature=0.8, top_k=5)
    assert bodies == [prompts[k // 2] + decode_bytes(t) for k, t in enumerate(expected)]

    # the first is what the one-prompt, one-sample command prints (streamed, no header)
    code, alone, _ = generate(capsys, text_run, "--prompt", prompts[0])
    assert code == 0 and alone == bodies[0] + "\n" and "---" not in alone


def test_cli_n_with_a_prompt_file(text_run, tmp_path, capsys):
    (tmp_path / "prompt.txt").write_text("Now is the")
    code, out, _ = generate(capsys, text_run, "--prompt-file", str(tmp_path / "prompt.txt"),
                            "--n", "3")
    assert code == 0
    assert [h for h in out.splitlines() if h.startswith("---")] == [
        f"--- prompt 1/1, sample {j}/3 ---" for j in (1, 2, 3)]
    assert "Now is the" not in out  # a prompt file is not echoed, as with one sample


@pytest.mark.parametrize("flags, named", [
    (["--n", "0"], "--n 0 must be >= 1"),
    (["--n", "-2"], "--n -2 must be >= 1"),
    (["--prompt", "Now", "--prompt", ""], "--prompt number 2 is empty"),
    (["--n", "2", "--temperature", "0"], "temperature=0"),
])
def test_cli_refuses_bad_batches_before_printing_anything(text_run, capsys, flags, named):
    code, out, err = generate(capsys, text_run, *flags)
    assert code == 2 and out == ""
    assert err.startswith("reformer ") and err.count("\n") == 1 and named in err, err
