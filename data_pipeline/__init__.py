"""Data pipeline: image sources, demo datasets, VAE latents in WebDataset shards, the packed streaming loader."""
