"""From-scratch model sizing and building. Importing this package does not import torch or
transformers (build.py imports them inside its functions)."""

from .build import build_causal_lm, count_params, hf_config
from .sizing import ModelShape, describe, make_shape, size_model

__all__ = ["ModelShape", "build_causal_lm", "count_params", "describe", "hf_config", "make_shape",
           "size_model"]
