"""Conversion to and from other implementations' checkpoints (DESIGN.md 3.3).

- :mod:`reformer.interop.hf`: Hugging Face ``transformers``' ``ReformerModelWithLMHead``
  directories (config.json with model.safetensors or pytorch_model.bin), their weights;
  :mod:`reformer.interop.hf_config`: their settings.
"""

from reformer.interop.hf import (
    config_from_hf,
    config_to_hf,
    from_hf,
    state_from_hf,
    state_to_hf,
    to_hf,
)

__all__ = ["config_from_hf", "config_to_hf", "from_hf", "state_from_hf", "state_to_hf", "to_hf"]
