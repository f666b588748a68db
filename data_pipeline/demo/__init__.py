"""Built-in demo datasets with fixed train/val/test splits."""
