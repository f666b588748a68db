"""Consolidate a training checkpoint (trainable weights only, any ZeRO stage) with its frozen base into a
LlamaFusion directory that `LlamaFusion.from_pretrained` loads."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from megafusion.config import config_from_dict
from megafusion.data_pipeline.tokenizer import load_tokenizer
from megafusion.model.fusion import LlamaFusion
from megafusion.training.dcp_checkpoints import EMA_KEY, DcpCheckpointManager, has_ema, is_dcp_checkpoint
from megafusion.training.run_checkpoints import EMA_FILE, CheckpointManager, hash_weights
from megafusion.training.run_setup import tokenizer_path

log = logging.getLogger(__name__)
MODULE_PREFIX = "model."  # the engine wraps LossModule(model=LlamaFusion)
DCP_MODEL_PREFIX = "model."  # the torch engine's DCP state: {"model": trainable weights, "optim": ...}


def _trainable_state(checkpoint_dir: Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    if zero_stage == 0:
        states = torch.load(checkpoint_dir / tag / "mp_rank_00_model_states.pt", weights_only=True)
        state = states["module"]
    else:
        # DeepSpeed's own consolidation: fp32 master weights gathered from every rank's ZeRO shard.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag, exclude_frozen_parameters=True)
    return {k.removeprefix(MODULE_PREFIX): v.float() for k, v in state.items()}


def dcp_trainable_state(path: Path, model: LlamaFusion, key: str = "model") -> dict[str, torch.Tensor]:
    """The full (unsharded) trainable weights of a torch-engine checkpoint, read in this one process: DCP
    assembles every tensor from the shards of whatever layout wrote it. key: "model" (the weights) or "ema"
    (their average)."""
    import torch.distributed.checkpoint as dcp

    prefix = key + "."
    names = [k.removeprefix(prefix) for k in dcp.FileSystemReader(str(path)).read_metadata()
             .state_dict_metadata if k.startswith(prefix)]
    own = model.state_dict()
    unknown = [n for n in names if n not in own]
    if unknown:
        raise ValueError(f"{path}: tensors {unknown[:3]} are not parameters of the model")
    state = {key: {n: torch.empty_like(own[n], dtype=torch.float32) for n in names}}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state[key]


def export_checkpoint(run_dir: str | Path, out_dir: str | Path, tag: str | None = None,
                      raw_weights: bool = False) -> Path:
    """run_dir: a `train.output_dir` (holding checkpoints/). Exports the newest checkpoint whose files match its
    manifest (damaged ones are named and skipped); verifies the base weights by hash. A checkpoint holding a
    weight average (train.ema_decay) exports the average unless raw_weights."""
    checkpoint_dir = Path(run_dir) / "checkpoints"
    tag = tag or CheckpointManager(checkpoint_dir, 1, {}, 0, 1).resume_tag()  # the newest intact one
    if tag is None:
        raise FileNotFoundError(f"{checkpoint_dir}: no complete checkpoint to export")
    torch_engine = is_dcp_checkpoint(checkpoint_dir / tag)
    if torch_engine:
        meta = DcpCheckpointManager(checkpoint_dir, 1, {}, 0, 1, writes_streams=False, client_extra={}).read_client(tag)
    else:
        meta = torch.load(checkpoint_dir / tag / "mp_rank_00_model_states.pt", weights_only=True)
    cfg = config_from_dict(meta["config"], source=f"{checkpoint_dir / tag} (stored config)")
    base = Path(meta["base"]["path"])
    if not base.exists() or hash_weights(base) != meta["base"]["sha256"]:
        raise ValueError(f"{checkpoint_dir / tag}: base model {base} is missing or its weights changed since training")
    model = LlamaFusion.from_llama(base, cfg.model.separation, cfg.image, cfg.unet, attention=cfg.model.attention,
                                   routing=cfg.model.routing)
    averaged = not raw_weights and (has_ema(checkpoint_dir / tag) if torch_engine
                                    else (checkpoint_dir / tag / EMA_FILE).is_file())
    if torch_engine:
        trainable = dcp_trainable_state(checkpoint_dir / tag, model, EMA_KEY if averaged else "model")
    elif averaged:
        trainable = load_file(str(checkpoint_dir / tag / EMA_FILE))
    else:
        trainable = _trainable_state(checkpoint_dir, tag, cfg.train.zero_stage)
    log.warning("%s: exporting %s", checkpoint_dir / tag,
                f"the weight average (decay {cfg.train.ema_decay})" if averaged else "the last step's weights")
    params = dict(model.named_parameters())
    unknown = [k for k in trainable if k not in params]
    if unknown:
        raise ValueError(f"{checkpoint_dir / tag}: tensors {unknown[:3]} are not parameters of the model")
    expected = {n for n in params if cfg.optim.lr_text > 0 or LlamaFusion.parameter_group(n) == "image"}
    missing = sorted(expected - trainable.keys())
    if missing:
        raise ValueError(f"{checkpoint_dir / tag}: trainable parameters missing from the checkpoint: {missing[:3]}")
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value)
    model.base_path = str(base)
    # What training set on its model (run_setup.setup_training), from the same stored config.
    model.diffusion_args = cfg.diffusion.args()
    model.document_prefix = list(load_tokenizer(tokenizer_path(cfg.data.tokenizer, base)).prefix_ids)
    return model.save_pretrained(out_dir)
