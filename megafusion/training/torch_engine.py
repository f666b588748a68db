"""`train.engine: torch`: tensor parallel x FSDP2 (megafusion.parallel) behind the three calls TrainStep makes of
a DeepSpeed engine (`engine(**inputs)`, `engine.backward(loss)`, `engine.step()`), so the loop, the objective,
the guards and the metrics are the DeepSpeed engine's own.

Setup order (torchtitan's): validate the layout (before any work), process group and mesh, the model on the meta
device, lr-0 groups frozen, parallelize_fusion, then rank 0's `LlamaFusion.from_llama` weights broadcast into
every rank's shards; AdamW and the LR schedule exactly as build_optimizer / build_lr_scheduler make them.

Gradients are SUMMED over data-parallel ranks (parallel/fsdp.py) and accumulated over micro-batches, and every
micro-batch's loss is normalised by the step's global counts (summed over the data-parallel group only: the tp
ranks of a replica see the same batch), so the loss scale is 1.

With parallel.pp > 1 (_setup_pipeline) the model is split into pipeline stages first (megafusion.parallel.pipeline)
and the step is training.pipeline_step.PipelineTrainStep; the engine then holds this rank's stages as one module
under the full model's parameter names, so checkpoints move between pipelined and unpipelined layouts."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy

from megafusion.config.schema import MegaFusionConfig
from megafusion.model.arch import LlamaArch
from megafusion.model.fusion import LlamaFusion
from megafusion.parallel import (
    MeshLayout,
    build_device_mesh,
    build_on_meta,
    check_parallel_support,
    clip_grad_norm_,
    dp_mesh,
    materialize,
    parallelize_fusion,
    tp_mesh,
)
from megafusion.parallel.pipeline import (
    PipelineRunner,
    RankModel,
    build_pipeline_mesh,
    build_stages,
    load_stage_weights,
    parallelize_stage,
    pipeline_clip_grad_norm_,
    pp_mesh,
)
from megafusion.parallel.pipeline_split import PipelinePlan, max_images_per_row, plan_pipeline
from megafusion.training.data_streams import DataStreams, seed_of_stream, streams_of_rank
from megafusion.training.dcp_checkpoints import DcpCheckpointManager
from megafusion.training.objective import build_objective
from megafusion.training.optim import build_lr_scheduler, build_optimizer, freeze_zero_lr_groups
from megafusion.training.run_setup import (
    RunContext,
    TrainingSetup,
    prepare_run,
    record_training_facts,
    resolve_precision,
    single_process_env,
)
from megafusion.training.step import LossModule, TrainStep

log = logging.getLogger(__name__)
# Only the trainable parameters (and their optimizer state) are a checkpoint's: the text set comes from the base.
TRAINABLE_ONLY = StateDictOptions(ignore_frozen_params=True)


class TorchEngine:
    """The DeepSpeed-engine surface TrainStep, StepMetrics and the checkpoints use. `step()` is called after every
    micro-batch and steps the optimizer (clip, AdamW, LR schedule) every `micro_batches_per_step` calls."""

    # No averaging to undo (TrainingSetup.loss_scale = accumulation x dp world size of the engine): gradients are
    # summed over micro-batches and data-parallel ranks of a globally normalised loss.
    dp_world_size = 1

    def __init__(self, module: LossModule | PipelineModule, optimizer: torch.optim.Optimizer, scheduler: Any, *,
                 micro_batches_per_step: int, grad_clip: float, autocast_dtype: torch.dtype | None,
                 device: torch.device, clip: Callable[[list[torch.Tensor], float], torch.Tensor] = clip_grad_norm_
                 ) -> None:
        """clip: the norm-and-clip over every rank holding a part of the model (pipeline: over all stages)."""
        self.module, self.optimizer, self.scheduler = module, optimizer, scheduler
        self.clip = clip
        self.micro_batches_per_step, self.grad_clip = micro_batches_per_step, grad_clip
        self.autocast_dtype, self.device = autocast_dtype, device
        self._micro = 0
        self._grad_norm: float | None = None

    def gradient_accumulation_steps(self) -> int:
        return 1

    def __call__(self, **inputs: Any) -> dict[str, Any]:
        inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        # bf16 without FSDP (one data-parallel rank): no MixedPrecisionPolicy applies, so autocast the forward.
        ctx = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
               else contextlib.nullcontext())
        with ctx:
            return self.module(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self._micro += 1
        if self._micro % self.micro_batches_per_step:
            return
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        # grad_clip 0 = no clipping (DeepSpeed's meaning); the norm is still measured for the metrics.
        norm = self.clip(trainable, self.grad_clip if self.grad_clip > 0 else float("inf"))
        self._grad_norm = float(norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> float | None:
        """The norm of the last optimizer step's gradients before clipping (as DeepSpeed reports it)."""
        return self._grad_norm

    def state_dict(self) -> dict[str, Any]:
        """Trainable weights and optimizer state as this rank's DTensor shards (DCP's input)."""
        model = self.module.model
        return {"model": get_model_state_dict(model, options=TRAINABLE_ONLY),
                "optim": get_optimizer_state_dict(model, self.optimizer, options=TRAINABLE_ONLY)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        model = self.module.model
        set_model_state_dict(model, state["model"], options=StateDictOptions(ignore_frozen_params=True,
                                                                               strict=False))
        set_optimizer_state_dict(model, self.optimizer, state["optim"], options=TRAINABLE_ONLY)


def base_arch(base: Path) -> LlamaArch:
    """The base's architecture, from its config.json when it has one (no weights read)."""
    if base.is_dir() and (base / "config.json").is_file():
        return LlamaArch.from_hf_config(json.loads((base / "config.json").read_text()), str(base / "config.json"))
    from megafusion.checkpoint.llama_reader import read_llama_checkpoint

    checkpoint = read_llama_checkpoint(base)
    return LlamaArch.from_hf_config(checkpoint.config, source=checkpoint.config_source)


def validate_torch_run(cfg: MegaFusionConfig, world_size: int) -> tuple[RunContext, MeshLayout, LlamaArch]:
    """Everything the torch engine can check before a process group or a model exists; errors name the keys.
    Returns the base's architecture too, which the meta-device build reuses."""
    ctx = prepare_run(cfg)
    arch = base_arch(ctx.base)
    p = cfg.parallel
    pipeline_plan(cfg, arch, world_size)
    layout = MeshLayout(p.dp_replicate, p.dp_shard, p.tp).resolve(world_size // p.pp, arch)
    check_parallel_support(layout, engine="torch", attention=cfg.model.attention, routing=cfg.model.routing)
    return ctx, layout, arch


def pipeline_plan(cfg: MegaFusionConfig, arch: LlamaArch, world_size: int) -> PipelinePlan:
    """The parallel.pp* settings checked against the world size, the model and the rest of the run config."""
    p = cfg.parallel
    plan = plan_pipeline(pp=p.pp, schedule=p.pp_schedule, microbatches=p.pp_microbatches, pp_layers=p.pp_layers,
                         num_layers=arch.num_layers, grad_accum_steps=cfg.train.grad_accum_steps,
                         engine=cfg.train.engine)
    if world_size % p.pp:
        raise ValueError(f"parallel.pp ({p.pp}) must divide the world size {world_size}")
    if p.pp > 1 and arch.tie_word_embeddings and cfg.optim.lr_text > 0:
        # The first and last stages each hold a copy of a tied table: a trained one would need their gradients
        # summed and both copies stepped alike, which nothing here does.
        raise ValueError(f"parallel.pp ({p.pp}) with a tied-embedding base needs optim.lr_text: 0 (got "
                         f"{cfg.optim.lr_text}): the first and last stages each keep a frozen copy of the table")
    if p.pp > 1 and cfg.model.routing != "index":
        raise ValueError(f"model.routing: {cfg.model.routing} is not supported with parallel.pp ({p.pp}) > 1; use "
                         "model.routing: index")
    return plan


def _init_process_group() -> tuple[int, int]:
    single_process_env()  # the mesh and DCP need a process group even for one rank
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def setup_torch_training(cfg: MegaFusionConfig) -> TrainingSetup:
    """run_setup.setup_training for train.engine: torch (the order is in this module's docstring)."""
    from megafusion.data_pipeline.tokenizer import load_tokenizer
    from megafusion.training.run_checkpoints import hash_weights

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    ctx, layout, arch = validate_torch_run(cfg, world_size)
    num_streams = _stream_count(cfg, ctx.output_dir / "checkpoints", layout)  # may refuse: still before any work
    tok = load_tokenizer(ctx.tokenizer)
    rank, world = _init_process_group()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if cfg.parallel.pp > 1:
        return _setup_pipeline(cfg, ctx, layout, arch, pipeline_plan(cfg, arch, world_size), num_streams, tok,
                               rank, world, device)
    mesh = build_device_mesh(layout)
    m = cfg.model
    model = build_on_meta(arch, m.separation, cfg.image, cfg.unet, attention=m.attention,
                          routing=m.routing)
    record_training_facts(model, cfg, tok, ctx.tokenizer)
    model.base_path = str(ctx.base)
    precision = resolve_precision(cfg.train.precision, model, rank)
    bf16 = precision.precision == "bf16"
    freeze_zero_lr_groups(model, cfg.optim)  # before parallelising: it replaces the parameters
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    parallelize_fusion(model, mesh, activation_checkpointing=cfg.train.activation_checkpointing, mp_policy=mp_policy)
    full = None
    if rank == 0:
        torch.manual_seed(cfg.train.seed)  # the U-Net init of the DeepSpeed engine's run with the same seed
        full = LlamaFusion.from_llama(ctx.base, m.separation, cfg.image, cfg.unet, attention=m.attention,
                                      routing=m.routing).state_dict()
    materialize(model, full, device)
    del full
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_lr_scheduler(optimizer, cfg.optim)

    dp = dp_mesh(mesh)
    checkpoints = DcpCheckpointManager(
        ctx.output_dir / "checkpoints", cfg.train.keep_last,
        {"path": str(ctx.base.resolve()), "sha256": hash_weights(ctx.base)}, rank, world,
        writes_streams=tp_mesh(mesh).get_local_rank() == 0,
        client_extra={"engine": "torch", "layout": [layout.dp_replicate, layout.dp_shard, layout.tp],
                      "streams": num_streams},
    )
    streams = streams_of_rank(num_streams, dp.get_local_rank(), dp.size())
    objective = build_objective(cfg)
    micro_batches = cfg.train.grad_accum_steps * len(streams)
    engine = TorchEngine(LossModule(model, objective), optimizer, scheduler, micro_batches_per_step=micro_batches,
                         grad_clip=cfg.train.grad_clip, autocast_dtype=torch.bfloat16 if bf16 and layout.dp == 1
                         else None, device=device)
    if rank == 0:
        log.warning("torch engine: dp_replicate %d x dp_shard %d x tp %d, %d data streams (%d per data-parallel "
                    "rank, %d micro-batches per optimizer step)", layout.dp_replicate, layout.dp_shard, layout.tp,
                    num_streams, len(streams), micro_batches)
    return TrainingSetup(cfg, ctx, rank, world, model, engine, optimizer,
                         StreamTrainStep(engine, cfg.image.tokens_per_image), precision,
                         data_group=dp.get_group(),
                         micro_batches_per_step=micro_batches, batch_replicas=layout.tp,
                         checkpoints=checkpoints, streams=streams)


def _setup_pipeline(cfg: MegaFusionConfig, ctx: RunContext, layout: MeshLayout, arch: LlamaArch, plan: PipelinePlan,
                    num_streams: int, tok: Any, rank: int, world: int, device: torch.device) -> TrainingSetup:
    """setup_torch_training for parallel.pp > 1: pipeline split, then per stage tp -> checkpointing -> FSDP2,
    then the stage's weights. Every rank reads the base once (only its stage's tensors are kept)."""
    from megafusion.training.pipeline_step import PipelineTrainStep
    from megafusion.training.run_checkpoints import hash_weights

    mesh = build_pipeline_mesh(plan.pp, layout)
    m = cfg.model
    model = build_on_meta(arch, m.separation, cfg.image, cfg.unet, attention=m.attention, routing=m.routing)
    record_training_facts(model, cfg, tok, ctx.tokenizer)
    model.base_path = str(ctx.base)
    precision = resolve_precision(cfg.train.precision, model, rank)
    bf16 = precision.precision == "bf16"
    freeze_zero_lr_groups(model, cfg.optim)
    max_images = cfg.train.micro_batch_size * max_images_per_row(cfg.data.max_len, cfg.image.tokens_per_image)
    stages = build_stages(model, plan, pp_mesh(mesh).get_local_rank(), max_images)
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    torch.manual_seed(cfg.train.seed)  # the U-Net init of one process with the same seed
    full = LlamaFusion.from_llama(ctx.base, m.separation, cfg.image, cfg.unet, attention=m.attention,
                                  routing=m.routing).state_dict()
    for stage in stages:
        parallelize_stage(stage, mesh, activation_checkpointing=cfg.train.activation_checkpointing,
                          mp_policy=mp_policy)
        load_stage_weights(stage, full, device)
    del full
    rank_model = RankModel(stages)
    optimizer = build_optimizer(rank_model, cfg.optim)
    scheduler = build_lr_scheduler(optimizer, cfg.optim)
    dp = dp_mesh(mesh)
    first_of_replica = tp_mesh(mesh).get_local_rank() == 0 and pp_mesh(mesh).get_local_rank() == 0
    checkpoints = DcpCheckpointManager(
        ctx.output_dir / "checkpoints", cfg.train.keep_last,
        {"path": str(ctx.base.resolve()), "sha256": hash_weights(ctx.base)}, rank, world,
        writes_streams=first_of_replica,
        client_extra={"engine": "torch", "layout": [layout.dp_replicate, layout.dp_shard, layout.tp],
                      "pp": plan.pp, "streams": num_streams},
    )
    streams = streams_of_rank(num_streams, dp.get_local_rank(), dp.size())
    # The stages compute the loss terms themselves (in full: train.skip_frozen_rows does not apply, and only saves
    # compute when it does); the objective gives the noise schedule and loss weight.
    objective = build_objective(cfg)
    micro_batches = cfg.train.grad_accum_steps * len(streams)
    engine = TorchEngine(PipelineModule(rank_model), optimizer, scheduler, micro_batches_per_step=micro_batches,
                         grad_clip=cfg.train.grad_clip, autocast_dtype=None, device=device,
                         clip=lambda params, max_norm: pipeline_clip_grad_norm_(params, max_norm, mesh))
    runner = PipelineRunner(plan, stages, mesh, device)
    image_shape = (cfg.image.latent_channels, cfg.image.latent_size, cfg.image.latent_size)
    step = PipelineTrainStep(engine, cfg.image.tokens_per_image, runner, objective, max_images=max_images,
                             image_shape=image_shape, rows=cfg.train.micro_batch_size, max_len=cfg.data.max_len,
                             autocast_dtype=torch.bfloat16 if bf16 and layout.dp == 1 else None)
    if rank == 0:
        log.warning("torch engine: pp %d (%s, %d micro-batches per schedule call, layers %s) x dp_replicate %d x "
                    "dp_shard %d x tp %d, %d data streams", plan.pp, plan.schedule, plan.microbatches,
                    [len(s) for s in plan.stage_layers], layout.dp_replicate, layout.dp_shard, layout.tp,
                    num_streams)
    return TrainingSetup(cfg, ctx, rank, world, model, engine, optimizer, step, precision,
                         data_group=dp.get_group(), micro_batches_per_step=micro_batches,
                         batch_replicas=layout.tp * plan.pp, checkpoints=checkpoints, streams=streams)


class PipelineModule(torch.nn.Module):
    """What TorchEngine holds under pipeline parallel: this rank's stages as one module (`model`, whose
    state-dict keys are the full model's), in place of LossModule."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model


def _stream_count(cfg: MegaFusionConfig, directory: Path, layout: MeshLayout) -> int:
    """The run's data streams: from the checkpoint it resumes, else this layout's data-parallel degree. Raises
    (naming the keys) when the layout cannot continue the checkpoint's data order."""
    checkpoints = DcpCheckpointManager(directory, 1, {}, 0, 1, writes_streams=False, client_extra={})
    tag = checkpoints.resume_tag() if cfg.train.resume else None  # the one the loop will resume
    if tag is None:
        return layout.dp
    client = checkpoints.read_client(tag)
    try:
        streams_of_rank(int(client["streams"]), 0, layout.dp)
    except ValueError as err:
        raise ValueError(f"{checkpoints.dir / tag}: {err}") from err
    if client.get("layout") != [layout.dp_replicate, layout.dp_shard, layout.tp] and os.environ.get("RANK", "0") == "0":
        log.warning("resuming %s (written at dp_replicate x dp_shard x tp = %s) at %d x %d x %d: weights and "
                    "optimizer state are resharded; its %d data streams continue as %d per data-parallel rank",
                    checkpoints.dir / tag, client.get("layout"), layout.dp_replicate, layout.dp_shard, layout.tp,
                    client["streams"], client["streams"] // max(1, layout.dp))
    return int(client["streams"])


class StreamTrainStep(TrainStep):
    """TrainStep drawing each micro-batch's timesteps and noise from its own data stream's generator (the loop's
    single generator is not used by this engine)."""

    streams: DataStreams | None = None

    def __call__(self, batch: dict[str, Any], generator: torch.Generator, normalizer: Any = None) -> Any:
        assert self.streams is not None, "build_torch_loader sets the streams"
        return super().__call__(batch, self.streams.generator(batch["stream"]), normalizer)


def build_torch_loader(run: TrainingSetup) -> DataStreams:
    """This rank's data streams (each a loader shard of S = the run's stream count, and its generator)."""
    from megafusion.data_pipeline.loader import LatentSequenceStream, build_loader

    cfg, model = run.cfg, run.model
    num_streams = run.checkpoints.client_extra["streams"]
    loaders, generators = [], []
    for s in run.streams:
        stream = LatentSequenceStream(run.ctx.shards, run.ctx.tokenizer, cfg.image.tokens_per_image, model.boi_id,
                                      model.eoi_id, cfg.data, rank=s, world_size=num_streams)
        loaders.append(build_loader(stream, cfg.train.micro_batch_size,
                                    allow_data_change=cfg.train.allow_data_change))
        generators.append(torch.Generator().manual_seed(seed_of_stream(cfg.train.seed, s)))
    streams = DataStreams(list(run.streams), loaders, generators)
    run.step.streams = streams
    return streams


__all__ = ["TorchEngine", "build_torch_loader", "setup_torch_training", "validate_torch_run"]
