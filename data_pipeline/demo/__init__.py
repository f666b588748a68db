"""Built-in demo datasets with fixed train/test splits."""
