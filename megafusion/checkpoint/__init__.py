"""Base-model checkpoints: fetching the real base LLM and converting GGUF files to HF layout."""
