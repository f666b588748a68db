"""`megafusion demo`: the whole LlamaFusion pipeline on a built-in dataset, on CPU, ending in a report.

Modules: `pipeline` (the steps, each reused when already done), `report` (report.md / report.json / loss
plot), `ablate` (the paper's section 5 grid at small scale), `cli`.
"""
