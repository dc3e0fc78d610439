"""complexformer: Complex Multi-Head Attention (CMHA) and the Power-Law Decay Loss (PDL) as exact,
fast PyTorch ops with C (CPU) and CUDA kernels. The math and contracts: docs/design.md."""
from ._ext import build_info
from .counts import pdl_weights, token_counts
from .pdl import PDLLoss, pdl_loss
from .fused_linear import fused_linear_pdl_loss
from .causal_lm import causal_lm_normalizer, causal_lm_pdl_loss
from .rotate import euler_rotate
from .attention import cmha_attention
from .partial_attention import merge_attention
from .module import CMHA, CMHACache

__version__ = "0.1.0"
__all__ = [
    "CMHA",
    "CMHACache",
    "PDLLoss",
    "build_info",
    "causal_lm_normalizer",
    "causal_lm_pdl_loss",
    "cmha_attention",
    "euler_rotate",
    "fused_linear_pdl_loss",
    "merge_attention",
    "pdl_loss",
    "pdl_weights",
    "token_counts",
]
