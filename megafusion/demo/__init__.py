"""`megafusion demo`: the whole LlamaFusion pipeline on a built-in dataset, on CPU, ending in a report.

Modules: `pipeline` (the steps, each reused when already done), `data_prep` (the demo VAE and latent shards,
shared with the ablation), `runs` (trained step, export, runs made stale by a new VAE), `report` (report.md /
report.json / loss plot), `ablate` (the paper's section 5 grid at small scale), `cli`.
"""
