"""Everything before the first training step: cheap validation of the run config (before any work), the process
group, the model with its frozen text path, the DeepSpeed engine around it, and the data loader."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megafusion.common.precision import PrecisionChoice, choose_precision, model_matmul_shapes
from megafusion.config.schema import MegaFusionConfig
from megafusion.data_pipeline.loader import LatentSequenceStream, build_loader
from megafusion.data_pipeline.tokenizer import TextTokenizer
from megafusion.model.fusion import LlamaFusion
from megafusion.training.deepspeed_setup import (
    apply_layer_checkpointing,
    deepspeed_config,
    keep_fp32_clip_norm,
    register_zero3_external_parameters,
)
from megafusion.training.ema import WeightEMA
from megafusion.training.objective import build_objective
from megafusion.training.optim import build_lr_scheduler, build_optimizer
from megafusion.training.safe_load import install_safe_loading
from megafusion.training.step import LossModule, TrainStep

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    base: Path
    shards: Path
    tokenizer: Path
    output_dir: Path
    max_steps: int


def tokenizer_path(data_tokenizer: str, base: Path) -> Path:
    """`data.tokenizer`, or the base model's directory when it is empty."""
    return Path(data_tokenizer) if data_tokenizer else (base if base.is_dir() else base.parent)


def prepare_run(cfg: MegaFusionConfig) -> RunContext:
    """All cheap validation, before any model is built; errors name the config key."""
    from megafusion.checkpoint.builtin_bases import resolve_base
    from megafusion.checkpoint.fetch_base import default_cache_dir
    from megafusion.data_pipeline.shard_format import read_index
    from megafusion.data_pipeline.shard_specs import resolve_shards

    if not cfg.model.base:
        raise ValueError("model.base: required (an HF Llama dir, a .gguf file, builtin:tiny-llama or smollm2-135m)")
    if not cfg.data.shards:
        raise ValueError("data.shards: required (a directory written by `megafusion precompute-latents`)")
    base = resolve_base(cfg.model.base)
    shards = resolve_shards(cfg.data.shards, default_cache_dir())
    index = read_index(shards)
    expected = [cfg.image.latent_channels, cfg.image.latent_size, cfg.image.latent_size]
    if list(index["latent_shape"]) != expected:
        raise ValueError(
            f"{shards}/index.json: latents are {index['latent_shape']}, but image.latent_channels/latent_size "
            f"say {expected}"
        )
    max_steps = cfg.train.max_steps or cfg.optim.total_steps
    deepspeed_config(cfg.train)  # raises on a bad or inconsistent DeepSpeed JSON
    if cfg.train.engine == "deepspeed":
        from megafusion.parallel import MeshLayout, check_parallel_support

        # A tp / dp_replicate layout would otherwise be silently ignored by a data-parallel-only engine.
        p = cfg.parallel
        check_parallel_support(MeshLayout(p.dp_replicate, p.dp_shard, p.tp), engine="deepspeed",
                               attention=cfg.model.attention, routing=cfg.model.routing)
        from megafusion.parallel.pipeline_split import check_pipeline_engine

        check_pipeline_engine(p.pp, "deepspeed")
    if cfg.train.zero_stage == 3 and cfg.model.routing == "triton":
        # The grouped GEMM reads both weight sets directly; ZeRO-3 gathers a weight only when its module is called.
        raise ValueError("model.routing: 'triton' does not work with train.zero_stage=3; use routing 'index' or 'auto'")
    return RunContext(base, shards, tokenizer_path(cfg.data.tokenizer, base), Path(cfg.train.output_dir), max_steps)


def single_process_env() -> None:
    """A plain `megafusion train` (no launcher): the environment of a one-rank process group."""
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))


def _init_distributed() -> tuple[int, int]:
    import deepspeed

    single_process_env()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    return dist.get_rank(), dist.get_world_size()


@dataclass
class TrainingSetup:
    cfg: MegaFusionConfig
    ctx: RunContext
    rank: int
    world: int
    model: LlamaFusion
    engine: Any
    optimizer: torch.optim.Optimizer
    step: TrainStep
    precision: PrecisionChoice
    # What differs on the torch engine (torch_engine.py); the defaults are the DeepSpeed engine's. data_group: the
    # ranks the step's loss counts are summed over (None = all: every DeepSpeed rank is a data-parallel rank).
    data_group: Any = None
    # Micro-batches per optimizer step on this rank (0 = train.grad_accum_steps).
    micro_batches_per_step: int = 0
    # Ranks that run the same micro-batch (the tp degree), so the metrics count its tokens once.
    batch_replicas: int = 1
    checkpoints: Any = None  # the engine's own checkpoint manager, when it has one
    streams: list[int] | None = None  # the data streams of this rank (torch engine)

    @property
    def loss_scale(self) -> float:
        """DeepSpeed divides the loss by the accumulation steps and averages gradients over its data-parallel ranks;
        a globally normalised loss is multiplied back by both."""
        return float(self.engine.gradient_accumulation_steps() * self.engine.dp_world_size)


def setup_training(cfg: MegaFusionConfig) -> TrainingSetup:
    """Validates, joins the process group, builds the model with its frozen text path and the engine
    (train.engine: DeepSpeed here, torch in torch_engine.py)."""
    if cfg.train.engine == "torch":
        from megafusion.training.torch_engine import setup_torch_training

        return setup_torch_training(cfg)
    import deepspeed

    from megafusion.data_pipeline.tokenizer import load_tokenizer

    ctx = prepare_run(cfg)
    rank, world = _init_distributed()
    torch.manual_seed(cfg.train.seed)  # identical U-Net init on every rank
    model = LlamaFusion.from_llama(ctx.base, cfg.model.separation, cfg.image, cfg.unet,
                                   attention=cfg.model.attention, routing=cfg.model.routing)
    record_training_facts(model, cfg, load_tokenizer(ctx.tokenizer), ctx.tokenizer)
    precision = resolve_precision(cfg.train.precision, model, rank)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_lr_scheduler(optimizer, cfg.optim)
    if cfg.train.activation_checkpointing:
        apply_layer_checkpointing(model)
    objective = build_objective(cfg)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=LossModule(model, objective), optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg.train, precision.precision),
    )
    install_safe_loading(engine)  # DeepSpeed's own loader would unpickle arbitrary objects
    keep_fp32_clip_norm(engine)
    if world == 1 and engine.zero_optimization_stage() == 0:
        # An all-reduce over one rank is the identity, but DeepSpeed still flattens and copies back every
        # gradient for it: measured 3.6% of a demo step (1.5 s of 42 s, AMD EPYC, 1 thread).
        engine.enable_backward_allreduce = False
    if engine.zero_optimization_stage() == 3:
        register_zero3_external_parameters(model)
    return TrainingSetup(cfg, ctx, rank, world, model, engine, optimizer,
                         TrainStep(engine, cfg.image.tokens_per_image), precision)


def build_ema(run: TrainingSetup) -> WeightEMA | None:
    """The weight average of train.ema_decay over the engine's trainable parameters (None when off)."""
    decay = run.cfg.train.ema_decay
    if decay <= 0:
        return None
    zero_stage = getattr(run.engine, "zero_optimization_stage", lambda: 0)()
    if zero_stage == 3:  # set by a train.deepspeed_config JSON (the config check sees only train.zero_stage)
        raise ValueError("train.ema_decay: not supported under ZeRO stage 3 (train.deepspeed_config sets it); "
                         "each rank holds only its shard of the weights")
    return WeightEMA(run.engine.module.model.named_parameters(), decay)


def record_training_facts(model: LlamaFusion, cfg: MegaFusionConfig, tok: TextTokenizer, tok_path: Path) -> None:
    """Checks the tokenizer fits the model, and stamps the model with what training uses, so every export carries
    it and sampling and evaluation use the same noise process and document prefix."""
    if tok.vocab_size > model.arch.vocab_size:
        raise ValueError(f"data.tokenizer {tok_path}: {tok.vocab_size} tokens exceed the model's "
                         f"vocabulary of {model.arch.vocab_size}")
    model.diffusion_args = cfg.diffusion.args()
    model.document_prefix = list(tok.prefix_ids)


def resolve_precision(requested: str, model: LlamaFusion, rank: int) -> PrecisionChoice:
    """`train.precision` as this run will use it. `auto` is measured once, on rank 0 at the model's own matmul
    shapes, and broadcast: every rank must run the same engine precision, and probes run side by side on a shared
    CPU would disturb each other."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    choice = [None]
    if rank == 0:
        arch = model.arch
        choice = [choose_precision(requested, device, model_matmul_shapes(arch.hidden_size, arch.intermediate_size))]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(choice, src=0)
    if rank == 0:
        log.warning("precision %s -> %s (%s; CPU %s)", requested, choice[0].precision, choice[0].reason,
                    choice[0].cpu or device)
    return choice[0]


def build_train_loader(run: TrainingSetup) -> Any:
    """This rank's stream of packed sequences, batched by train.micro_batch_size."""
    if run.streams is not None:
        from megafusion.training.torch_engine import build_torch_loader

        return build_torch_loader(run)
    cfg, model = run.cfg, run.model
    stream = LatentSequenceStream(run.ctx.shards, run.ctx.tokenizer, cfg.image.tokens_per_image, model.boi_id,
                                  model.eoi_id, cfg.data, rank=run.rank, world_size=run.world)
    return build_loader(stream, cfg.train.micro_batch_size, allow_data_change=cfg.train.allow_data_change)


def check_resume_world(engine: Any, step_dir: Path, world: int) -> None:
    """Before DeepSpeed loads a checkpoint written with another world size: only ZeRO 0 state reshards (DeepSpeed
    refuses partitioned optimizer state with a traceback), so anything else stops here in one line."""
    saved = len(list(step_dir.glob("rank*.pt")))
    stage = engine.zero_optimization_stage()
    if saved and saved != world and stage != 0:
        raise ValueError(f"{step_dir}: written with {saved} ranks, resuming with {world}: DeepSpeed cannot reshard "
                         f"ZeRO stage {stage} optimizer state; resume with {saved} ranks, or train with "
                         "train.zero_stage=0 or train.engine=torch (resharding checkpoints) from the run's start")


def restore_loader(loader: Any, directory: Path, rank: int, saved_world: int) -> dict[str, Any] | None:
    """Restores a DeepSpeed run's loader from checkpoint `directory` (rank<r>.pt per rank); returns this rank's
    saved file (None if the checkpoint had no such rank). On the world size it was written with, each rank takes
    its own loader state (exact); on another, the layout-free union of every rank's (data_pipeline/loader.py)."""
    from megafusion.data_pipeline.loader import merge_loader_states

    def rank_file(r: int) -> dict[str, Any]:
        return torch.load(directory / f"rank{r}.pt", weights_only=True)

    world = dist.get_world_size() if dist.is_initialized() else 1
    own = rank_file(rank) if rank < saved_world else None
    if saved_world == world:
        loader.load_state_dict(own["loader"])
        return own
    loader.load_state_dict(merge_loader_states([rank_file(r)["loader"] for r in range(saved_world)]))
    if rank == 0:
        log.warning("%s: written with %d ranks, resuming with %d: the data continues from the merged record of "
                    "every rank (each sample of the epoch still once); ranks it did not have start fresh noise "
                    "generators", directory, saved_world, world)
    return own
