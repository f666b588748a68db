"""The LlamaFusion model (what the model is; how it is trained or parallelised lives elsewhere)."""

from megafusion.model.arch import LlamaArch, UnsupportedCheckpointError
from megafusion.model.fusion import FusionOutput, LlamaFusion
from megafusion.model.hybrid_mask import CachedHybridMask, HybridMask
from megafusion.model.kv_cache import PAD_DOC, KVCache
from megafusion.model.layout import IMAGE, TEXT, TokenLayout
from megafusion.model.routing import ModalityRouter

__all__ = [
    "IMAGE",
    "PAD_DOC",
    "TEXT",
    "CachedHybridMask",
    "FusionOutput",
    "HybridMask",
    "KVCache",
    "LlamaArch",
    "LlamaFusion",
    "ModalityRouter",
    "TokenLayout",
    "UnsupportedCheckpointError",
]
