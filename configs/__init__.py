"""Run configs (`*.yaml`) and DeepSpeed templates (`deepspeed/*.json`), installed as `megafusion.configs`.

Not meant to be imported for code: `megafusion.config.loader.resolve_config_path` finds these files with
importlib.resources, so a bare name (`--config demo-digits`) works in an installed wheel as well as a checkout."""
