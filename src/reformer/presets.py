"""Named model presets, each with the training settings it was sized for.

A preset pairs a :class:`ReformerConfig` (the architecture) with defaults for the training run
(context length, batch, learning rate, steps), so that ``reformer train --preset NAME`` is a
sensible run on the hardware the preset names. The training defaults are plain field names of
:class:`reformer.training.TrainConfig`; this module imports nothing from training so that the
model side of the package stays independent of it.

Presets:
- ``tiny``: a 2-layer, 1K-context model that trains in a couple of minutes on a laptop CPU.
- ``shakespeare`` (the default): 4 layers alternating local and LSH attention, 16K-context
  windows of Shakespeare; ``make demo`` trains it for a few minutes on the CPU.
- ``synthetic``: the paper's one-layer model for the duplication task 0w0w (section 2.1,
  d_model = d_ff = 256, 4 heads), here with |w| = 127 (length 256) and chunks of 32 so that a
  CPU trains it in minutes; ``reformer synthetic train`` picks its attention. Positions are
  learned per position: with axial (16 x 16) positions full attention stalled at 82% accuracy
  (the columns whose "127 back" a shared-QK dot product cannot single out), with learned ones
  it reached 100% in 200 steps (docs/synthetic.md).
- ``images-cpu``: pictures pixel by pixel at 32x32x3 = 3,072 tokens (local attention within
  about two rows of sub-pixels, LSH across the picture), sized to learn visibly in 20 minutes
  on a 2-core CPU; axial positions shaped (row, column, channel).
- ``listops``, ``classify``, ``mlm``: bidirectional trunks (``causal=False``, LSH looking
  one chunk both ways) for the heads of reformer.heads: Long Range Arena's ListOps (up to
  2,000 tokens, sinusoidal positions, 16 tokens read at each end by a classifier with a
  hidden layer, token embeddings drawn at std 0.7 and lr 1e-3: the tenth run of
  docs/lra.md; the eleventh, this preset as shipped, reached 38.60% test accuracy in 85
  minutes, and the same model with full attention 36.30%), byte-level text classification
  at 4K, and masked language modelling of 4K windows (vocabulary 257: the bytes and the
  mask token).
- ``listops-mlm``: the ``listops`` trunk trained by masked language modelling of ListOps's
  inputs, to start a ``listops`` run from (``--init-from``). Both presets' vocabulary is 17,
  ListOps's 16 symbols and the mask token, so the one's trunk fits the other.
- ``seq2seq``: the encoder-decoder (reformer.encoder_decoder) with this shape on both sides,
  the encoder reading both ways and the decoder causally (vocabulary 258: the bytes, the
  start and the end token).
- ``imagenet64``: the paper's image setting, 64x64x3 = 12,288 tokens, 12 layers of d_model
  1024 (a GPU model; the layer layout is ours).
- ``enwik8``: the paper's byte-level model (Kitaev et al. 2020, section 5): 12 layers,
  d_model 1024, d_ff 4096, 8 heads of 128, 64K context, LSH attention in every fourth layer and
  chunked local attention elsewhere (after the layout of trax's enwik8 configuration). It
  needs a GPU.

Decision: the model's ``max_seq_len`` always equals the training ``seq_len``; the trainer
rebuilds the config when ``--seq-len`` changes it (see :func:`with_seq_len`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from reformer.config import ReformerConfig


@dataclass(frozen=True)
class Preset:
    """A model architecture and the training defaults it was sized for."""

    name: str
    description: str
    model: ReformerConfig
    training: dict[str, Any] = field(default_factory=dict)


def _reads_both_ways(**shape: Any) -> ReformerConfig:
    """The heads' CPU trunk: d_model 128, 4 heads, local and LSH layers (2 rounds, chunks of
    64) that look one chunk both ways."""
    return ReformerConfig(d_model=128, n_heads=4, attn_layers=("local", "lsh"), n_hashes=2,
                          chunk_length=64, local_chunk_length=64, n_chunks_after=1,
                          causal=False, attn_head_chunk_size=4, **shape)


# ListOps's classifier and its masked-LM pre-training share one trunk (vocabulary 17: the 16
# symbols of reformer.data.listops and listops-mlm's mask token). Token embeddings start at
# std 0.7, comparable to the unit-amplitude sinusoidal positions (docs/lra.md, tenth run)
LISTOPS_TRUNK = _reads_both_ways(vocab_size=17, d_ff=256, n_layers=4, max_seq_len=2048,
                                 pos_embedding="sinusoidal", embed_init_std=0.7)
# ... and their optimisation and schedule (the fourth run's, docs/lra.md)
LISTOPS_TRAINING = dict(seq_len=2048, batch_size=8, steps=100000, lr=3e-3, warmup_steps=100,
                        eval_every=200, checkpoint_every=100, precision="bf16")

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="tiny",
            description="2 layers, d_model 64, 1K context: minutes on a laptop CPU",
            model=ReformerConfig(
                vocab_size=256, d_model=64, n_heads=2, d_ff=256, n_layers=2,
                attn_layers=("local", "lsh"), n_hashes=2, chunk_length=32,
                local_chunk_length=32, max_seq_len=1024, attn_head_chunk_size=2),
            training=dict(seq_len=1024, batch_size=4, steps=300, lr=3e-3, warmup_steps=20,
                          eval_every=50, eval_windows=4, checkpoint_every=100),
        ),
        Preset(
            name="shakespeare",
            description="4 layers local/LSH, d_model 128, 16K context (the default, CPU)",
            model=ReformerConfig(
                vocab_size=256, d_model=128, n_heads=4, d_ff=512, n_layers=4,
                attn_layers=("local", "lsh"), n_hashes=2, chunk_length=64,
                local_chunk_length=64, max_seq_len=16384, attn_head_chunk_size=4),
            training=dict(seq_len=16384, batch_size=1, steps=2000, lr=3e-3, warmup_steps=10,
                          eval_every=50, eval_windows=2, checkpoint_every=50),
        ),
        Preset(
            name="synthetic",
            description="the paper's 1-layer model for the 0w0w duplication task, |w| = 127",
            model=ReformerConfig(
                vocab_size=128, d_model=256, n_heads=4, d_ff=256, n_layers=1,
                attn_layers=("lsh",), n_hashes=4, chunk_length=32, max_seq_len=256,
                pos_embedding="learned", attn_head_chunk_size=4),
            training=dict(task="synthetic", seq_len=256, batch_size=16, steps=2000, lr=1e-3,
                          warmup_steps=100, eval_every=100, eval_windows=64,
                          checkpoint_every=500),
        ),
        Preset(
            name="images-cpu",
            description="4 layers local/LSH, d_model 128, 32x32 RGB pictures (CPU, ~20 min)",
            model=ReformerConfig(
                vocab_size=256, d_model=128, n_heads=4, d_ff=512, n_layers=4,
                attn_layers=("local", "lsh"), n_hashes=2, chunk_length=64,
                local_chunk_length=128, max_seq_len=3072, axial_pos_shape=(32, 32, 3),
                attn_head_chunk_size=4),
            training=dict(task="images", image_size=32, image_channels=3, seq_len=3072,
                          batch_size=4, steps=3000, max_minutes=20.0, lr=2e-3,
                          warmup_steps=50, eval_every=100, eval_windows=8,
                          checkpoint_every=100),
        ),
        Preset(
            name="listops",
            description="Long Range Arena's ListOps: a 4-layer bidirectional classifier, "
            "up to 2,000 tokens (CPU)",
            model=LISTOPS_TRUNK,
            training=dict(LISTOPS_TRAINING, task="listops", max_minutes=85.0,
                          eval_windows=400, pooling="ends", pool_width=16, head_hidden=256,
                          lr=1e-3),
        ),
        Preset(
            name="listops-mlm",
            description="the listops trunk pre-trained by masked language modelling of "
            "ListOps's inputs, for --init-from (CPU)",
            model=LISTOPS_TRUNK,
            training=dict(LISTOPS_TRAINING, task="listops-mlm", max_minutes=40.0,
                          eval_windows=100),
        ),
        Preset(
            name="classify",
            description="a 4-layer bidirectional text classifier over bytes, 4K context (CPU)",
            model=_reads_both_ways(vocab_size=256, d_ff=512, n_layers=4, max_seq_len=4096),
            training=dict(task="classify", seq_len=4096, batch_size=8, steps=1000, lr=1e-3,
                          warmup_steps=50, eval_every=100, eval_windows=256,
                          checkpoint_every=100),
        ),
        Preset(
            name="mlm",
            description="masked language modelling: a 4-layer bidirectional byte model, "
            "4K windows of Shakespeare (CPU)",
            model=_reads_both_ways(vocab_size=257, d_ff=512, n_layers=4, max_seq_len=4096),
            training=dict(task="mlm", seq_len=4096, batch_size=4, steps=2000, lr=2e-3,
                          warmup_steps=50, eval_every=100, eval_windows=8,
                          checkpoint_every=100),
        ),
        Preset(
            name="seq2seq",
            description="an encoder-decoder over bytes: 2 + 2 layers, d_model 128, sources "
            "and targets up to 4K bytes (CPU)",
            model=_reads_both_ways(vocab_size=258, d_ff=512, n_layers=2, max_seq_len=4096),
            training=dict(task="seq2seq", seq_len=4096, batch_size=8, steps=2000, lr=1e-3,
                          warmup_steps=50, eval_every=100, eval_windows=64,
                          checkpoint_every=100),
        ),
        Preset(
            name="imagenet64",
            description="the paper's 64x64x3 = 12,288-token image model, 12 layers (GPU)",
            model=ReformerConfig(
                vocab_size=256, d_model=1024, n_heads=8, d_head=128, d_ff=4096,
                n_layers=12, attn_layers=("local", "lsh"), n_hashes=2, chunk_length=128,
                local_chunk_length=128, max_seq_len=12288, axial_pos_shape=(64, 64, 3),
                axial_pos_dims=(384, 384, 256), dropout=0.0, attn_head_chunk_size=8),
            training=dict(task="images", image_size=64, image_channels=3, seq_len=12288,
                          batch_size=1, grad_accum=8, steps=100_000, lr=3e-4,
                          warmup_steps=2000, eval_every=1000, eval_windows=16,
                          checkpoint_every=500, precision="bf16"),
        ),
        Preset(
            name="enwik8",
            description="the paper's 12-layer, 64K-context byte model (needs a GPU)",
            model=ReformerConfig(
                vocab_size=256, d_model=1024, n_heads=8, d_head=128, d_ff=4096,
                n_layers=12, attn_layers=("local", "local", "lsh", "local"), n_hashes=2,
                chunk_length=256, local_chunk_length=128, max_seq_len=65536,
                axial_pos_shape=(128, 512), axial_pos_dims=(256, 768), dropout=0.1,
                attn_head_chunk_size=8),
            training=dict(seq_len=65536, batch_size=1, grad_accum=8, steps=100_000, lr=3e-4,
                          warmup_steps=2000, eval_every=1000, eval_windows=4,
                          checkpoint_every=500, precision="bf16"),
        ),
    )
}

DEFAULT_PRESET = "shakespeare"


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a ValueError lists the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def with_seq_len(config: ReformerConfig, seq_len: int) -> ReformerConfig:
    """``config`` resized to ``max_seq_len=seq_len``.

    The axial shape and dims are derived afresh for the new length (an explicit shape for
    another length would either not cover ``seq_len`` or waste parameters).
    """
    if config.max_seq_len == seq_len:
        return config
    changes: dict[str, Any] = {"max_seq_len": seq_len}
    if config.pos_embedding == "axial":
        changes.update(axial_pos_shape=None, axial_pos_dims=None)
    return config.replace(**changes)
