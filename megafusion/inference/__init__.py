"""Inference: text generation with a KV cache, image generation, captioning, interleaving, editing."""
