"""megafusion: a trainer for LlamaFusion-style multimodal models."""

__version__ = "0.1.0"
