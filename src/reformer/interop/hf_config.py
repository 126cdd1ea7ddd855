"""Hugging Face Reformer settings: transformers' ``ReformerConfig`` <-> ours.

:func:`config_from_hf` maps an HF ``config.json`` dict to a :class:`ReformerConfig` with
``hf_compat=True`` (our model then computes HF's function; DESIGN.md 3.3) and
:func:`config_to_hf` maps back. Every HF key is mapped, ignored because it does not change
what ``ReformerModelWithLMHead`` computes (:data:`IGNORED`), or refused.

Mapped: vocab_size, hidden_size -> d_model, num_attention_heads -> n_heads,
attention_head_size -> d_head, feed_forward_size -> d_ff, attn_layers (HF's full per-layer
list; ours cycles, so it is kept whole and n_layers = its length), num_hashes, num_buckets
(a list becomes a tuple), lsh_attn_chunk_length -> chunk_length, lsh_num_chunks_* ->
n_chunks_*, local_attn_chunk_length, local_num_chunks_* -> local_n_chunks_*, hash_seed,
is_decoder -> causal, max_position_embeddings -> max_seq_len, axial_pos_embds (axial, else
learned positions), axial_pos_shape, axial_pos_embds_dim -> axial_pos_dims, hidden_act,
hidden_dropout_prob -> dropout, the attention dropouts -> attention_dropout, layer_norm_eps,
initializer_range -> init_std, pad_token_id (null -> 0).

Refused, each with its reason: tied word embeddings, attention kinds other than lsh/local,
activations other than relu and exact gelu (e.g. gelu_new, swish), odd bucket counts, unset
LSH settings in a model with LSH layers, unknown keys (another Reformer version); on export
also full attention, de-duplicated LSH rounds, no positional embedding, axial positions with
other than two axes (HF's evaluation reads two), non-causal models
(``ReformerModelWithLMHead`` is a decoder) and ``hf_compat=False``.

Decision: HF has one attention dropout per kind, we have one. When they differ (the published
enwik8 model: 0.1 for LSH, 0.2 for local) the import warns and takes the LSH rate, rather than
refusing a model whose evaluation does not depend on it.
"""

from __future__ import annotations

import warnings
from typing import Any

from reformer.config import ReformerConfig, fail

# transformers' ReformerConfig defaults (the same in 4.x and 5.x), for keys a config.json omits.
HF_DEFAULTS: dict[str, Any] = {
    "attention_head_size": 64, "attn_layers": ["local", "lsh", "local", "lsh", "local", "lsh"],
    "axial_pos_embds": True, "axial_pos_shape": [64, 64], "axial_pos_embds_dim": [64, 192],
    "feed_forward_size": 512, "hash_seed": None, "hidden_act": "relu",
    "hidden_dropout_prob": 0.05, "hidden_size": 256, "initializer_range": 0.02,
    "is_decoder": False, "layer_norm_eps": 1e-12, "local_num_chunks_before": 1,
    "local_num_chunks_after": 0, "local_attention_probs_dropout_prob": 0.05,
    "local_attn_chunk_length": 64, "lsh_attn_chunk_length": 64,
    "lsh_attention_probs_dropout_prob": 0.0, "lsh_num_chunks_before": 1,
    "lsh_num_chunks_after": 0, "max_position_embeddings": 4096, "num_attention_heads": 12,
    "num_buckets": None, "num_hashes": 1, "vocab_size": 320, "pad_token_id": 0,
    "tie_word_embeddings": False,
}
# Keys that leave the function of ReformerModelWithLMHead unchanged: bookkeeping, labels,
# generation settings and token ids, head-pruning records (Reformer prunes nothing), chunking
# that only bounds memory (chunk_size_*), the initialisation of axial tables
# (axial_norm_std), the decoding cache switch, a classifier head's dropout and
# num_hidden_layers (always len(attn_layers)). Keys starting with "_" are bookkeeping too.
IGNORED = frozenset("""
    architectures model_type transformers_version dtype torch_dtype use_bfloat16
    output_hidden_states output_attentions return_dict use_return_dict torchscript
    id2label label2id num_labels problem_type finetuning_task tokenizer_class prefix
    task_specific_params is_encoder_decoder add_cross_attention cross_attention_hidden_size
    tie_encoder_decoder pruned_heads tf_legacy_loss bos_token_id eos_token_id sep_token_id
    decoder_start_token_id max_length min_length do_sample early_stopping num_beams
    num_beam_groups diversity_penalty temperature top_k top_p typical_p repetition_penalty
    length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size bad_words_ids
    num_return_sequences output_scores return_dict_in_generate forced_bos_token_id
    forced_eos_token_id remove_invalid_values exponential_decay_length_penalty
    suppress_tokens begin_suppress_tokens chunk_size_lm_head chunk_size_feed_forward
    axial_norm_std use_cache classifier_dropout num_hidden_layers""".split())

# (HF config key, our field): the same value on both sides.
_SAME = (("vocab_size", "vocab_size"), ("hidden_size", "d_model"),
         ("num_attention_heads", "n_heads"), ("attention_head_size", "d_head"),
         ("feed_forward_size", "d_ff"), ("num_hashes", "n_hashes"),
         ("local_attn_chunk_length", "local_chunk_length"),
         ("local_num_chunks_before", "local_n_chunks_before"),
         ("local_num_chunks_after", "local_n_chunks_after"), ("hash_seed", "hash_seed"),
         ("is_decoder", "causal"), ("max_position_embeddings", "max_seq_len"),
         ("hidden_dropout_prob", "dropout"), ("layer_norm_eps", "layer_norm_eps"),
         ("initializer_range", "init_std"))
# The LSH layers' settings; HF leaves them None in models without LSH layers.
_LSH = (("lsh_attn_chunk_length", "chunk_length"), ("lsh_num_chunks_before", "n_chunks_before"),
        ("lsh_num_chunks_after", "n_chunks_after"))
ACTIVATIONS = ("relu", "gelu")  # HF's "gelu" is the exact (erf) one, as F.gelu's default


# ------------------------------------------------------------------------------- config
def config_from_hf(hf: dict[str, Any]) -> ReformerConfig:
    """Our config for an HF ``config.json`` dict, with ``hf_compat=True``.

    Keys it omits take transformers' defaults (:data:`HF_DEFAULTS`); keys in
    :data:`IGNORED` do not change the model; any other key is refused.
    """
    if hf.get("model_type", "reformer") != "reformer":
        fail("model_type", hf["model_type"], "is not a Reformer",
             "pass a directory saved from transformers' ReformerModelWithLMHead")
    unknown = sorted(k for k in hf if k not in HF_DEFAULTS and k not in IGNORED
                     and not k.startswith("_"))
    if unknown:
        raise ValueError(f"unknown Hugging Face config keys {unknown}: transformers 4 and 5 "
                         "ignore them, so the model may not be the one trained (older "
                         "versions' names?); set the current keys to match and remove these")
    h = {**HF_DEFAULTS, **{k: v for k, v in hf.items() if k in HF_DEFAULTS}}
    kinds = tuple(h["attn_layers"])
    _check_importable(h, kinds)
    fields = {ours: h[theirs] for theirs, ours in _SAME}
    fields.update({ours: h[theirs] for theirs, ours in _LSH if h[theirs] is not None})
    nb = h["num_buckets"]
    fields.update(n_layers=len(kinds), attn_layers=kinds, ff_activation=h["hidden_act"],
                  n_buckets=tuple(nb) if isinstance(nb, (list, tuple)) else nb,
                  attention_dropout=_attention_dropout(h, kinds), hf_compat=True,
                  pad_token_id=0 if h["pad_token_id"] is None else h["pad_token_id"])
    if h["axial_pos_embds"]:
        fields.update(pos_embedding="axial", axial_pos_shape=tuple(h["axial_pos_shape"]),
                      axial_pos_dims=tuple(h["axial_pos_embds_dim"]))
    else:
        fields["pos_embedding"] = "learned"
    try:
        return ReformerConfig(**fields)
    except ValueError as err:
        raise ValueError(f"the Hugging Face config maps to an invalid model: {err}") from err


def _check_importable(h: dict[str, Any], kinds: tuple[str, ...]) -> None:
    if h["tie_word_embeddings"]:
        fail("tie_word_embeddings", True, "cannot hold: the output layer reads 2 * hidden_size "
             "features and the embedding has hidden_size", "set it to false in config.json")
    for kind in kinds:
        if kind not in ("lsh", "local"):
            fail("attn_layers", list(kinds), f"contains {kind!r}; only 'lsh' and 'local' "
                 "layers exist in HF's Reformer", "use a config written by transformers")
    if h["hidden_act"] not in ACTIVATIONS:
        fail("hidden_act", h["hidden_act"], f"is not one of {ACTIVATIONS} (the feed-forward "
             "activations our model computes)", "only relu and gelu models can be imported")
    nb = h["num_buckets"]
    factors = nb if isinstance(nb, (list, tuple)) else [] if nb is None else [nb]
    if any(not isinstance(f, int) or f < 2 or f % 2 for f in factors):
        fail("num_buckets", nb, "must be even integers >= 2 (a factor is hashed by argmax "
             "over [xR, -xR]; HF requires it too)", "pass e.g. 64 or [32, 64], or null")
    if "lsh" in kinds:
        for theirs, _ in _LSH:
            if h[theirs] is None:
                fail(theirs, None, "must be set in a model with LSH layers",
                     "set it in config.json (transformers' default is "
                     f"{HF_DEFAULTS[theirs]})")


def _attention_dropout(h: dict[str, Any], kinds: tuple[str, ...]) -> float:
    """Our one attention dropout rate: the LSH layers' when both kinds differ (a warning)."""
    rates = {kind: h[f"{kind}_attention_probs_dropout_prob"] for kind in dict.fromkeys(kinds)}
    if len(set(rates.values())) > 1:
        warnings.warn(f"local_attention_probs_dropout_prob={rates['local']} differs from "
                      f"lsh_attention_probs_dropout_prob={rates['lsh']}; our config has one "
                      f"attention_dropout and takes {rates['lsh']} for every layer (evaluation "
                      "is unaffected; fine-tuning drops local attention weights at that rate)",
                      UserWarning, stacklevel=3)
    return rates.get("lsh", rates.get("local", 0.0))


def config_to_hf(cfg: ReformerConfig, masked_lm: bool = False) -> dict[str, Any]:
    """An HF ``config.json`` dict for ``cfg`` (``transformers.ReformerConfig(**d)`` takes it):
    of a ``ReformerModelWithLMHead``, or with ``masked_lm`` a ``ReformerForMaskedLM``.

    Settings that only schedule the computation (reversible, *_chunk_size) are not written.
    """
    kinds = [cfg.layer_kind(i) for i in range(cfg.n_layers)]
    _check_exportable(cfg, kinds, masked_lm)
    before, after = cfg.local_neighbours()
    nb = cfg.n_buckets
    d: dict[str, Any] = {theirs: getattr(cfg, ours) for theirs, ours in _SAME + _LSH}
    architecture = "ReformerForMaskedLM" if masked_lm else "ReformerModelWithLMHead"
    d.update(architectures=[architecture], model_type="reformer",
             attn_layers=kinds, num_buckets=list(nb) if isinstance(nb, tuple) else nb,
             local_num_chunks_before=before, local_num_chunks_after=after,
             hidden_act=cfg.ff_activation, lsh_attention_probs_dropout_prob=cfg.attention_dropout,
             local_attention_probs_dropout_prob=cfg.attention_dropout,
             axial_pos_embds=cfg.pos_embedding == "axial", pad_token_id=cfg.pad_token_id,
             tie_word_embeddings=False, eos_token_id=None)  # no end-of-text token here
    if cfg.pos_embedding == "axial":
        d.update(axial_pos_shape=list(cfg.axial_pos_shape),
                 axial_pos_embds_dim=list(cfg.axial_pos_dims))
    return d


def _check_exportable(cfg: ReformerConfig, kinds: list[str], masked_lm: bool) -> None:
    if "full" in kinds:
        fail("attn_layers", cfg.attn_layers, "has full attention, which HF's Reformer lacks",
             "export a model of lsh and local layers")
    if cfg.dedup_rounds and "lsh" in kinds:
        fail("dedup_rounds", True, "has no HF equivalent (HF counts a pair found by several "
             "rounds once per round)", "rebuild with dedup_rounds=False")
    if cfg.pos_embedding in ("none", "sinusoidal"):
        fail("pos_embedding", cfg.pos_embedding, "has no HF equivalent",
             "use axial or learned positions")
    if cfg.pos_embedding == "axial" and len(cfg.axial_pos_shape) != 2:
        fail("axial_pos_shape", cfg.axial_pos_shape, "must have two axes for HF (its "
             "evaluation reads exactly two)", "train with a two-axis shape")
    if not cfg.causal and not masked_lm:
        fail("causal", False, "cannot be exported as ReformerModelWithLMHead, a decoder "
             "(is_decoder=True)", "export a causal model, or a ReformerForMaskedLM")
    if not cfg.hf_compat:
        fail("hf_compat", False, "describes another function than HF's Reformer computes "
             "(key epsilon, circular windows, padding, rotation draws)",
             "rebuild with config.replace(hf_compat=True), load the weights and check it")
