"""The configuration schema. Every field has a paper-grounded default; `__post_init__` rejects bad values
with a message that starts with the offending field name (the loader prefixes file and section)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megafusion.data_pipeline.loader import LoaderSettings
from megafusion.model.args import (
    ATTENTION_CHOICES,
    SEPARATIONS,
    AttentionChoice,
    BetaSchedule,
    DiffusionArgs,
    ImageConfig,
    PredictionType,
    RoutingChoice,
    Separation,
    UNetConfig,
)

__all__ = [
    "ATTENTION_CHOICES", "SEPARATIONS", "DataConfig", "DiffusionConfig", "ImageConfig", "MegaFusionConfig",
    "ModelConfig", "OptimConfig", "ParallelConfig", "TrainConfig", "UNetConfig",
]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class ModelConfig:
    # HF Llama directory (config.json + safetensors) or a .gguf file.
    base: str = ""
    separation: Separation = "deep"
    # How the shared attention is computed (same function, different kernels): sdpa (reference: dense boolean
    # mask), flex (FlexAttention from per-token ids; CPU inference, or where Triton is absent), triton (hybrid-mask
    # FlashAttention, CUDA), auto (triton on CUDA when importable, else sdpa).
    attention: AttentionChoice = "sdpa"
    # How routed projections run: index (reference: one matmul per modality slice), triton (one grouped-GEMM
    # launch over [text | image] rows; CUDA; not with DeepSpeed ZeRO-3), auto (triton on CUDA when importable).
    routing: RoutingChoice = "index"


@dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    # Named as in diffusers: squaredcos_cap_v2 (the paper's cosine schedule, Nichol & Dhariwal) or linear.
    beta_schedule: BetaSchedule = "squaredcos_cap_v2"
    # What the U-Net up predicts: epsilon (the paper: the noise) or v_prediction (Salimans & Ho 2022:
    # v = sqrt(abar) eps - sqrt(1 - abar) x0, so at high noise the output is the clean image and its error is not
    # scaled down by the tiny SNR there). Saved with the model; samplers and evaluation read it from there.
    prediction_type: PredictionType = "epsilon"
    # lambda in L = L_LM + lambda * L_DDPM; the paper does not print it, Transfusion uses 5.
    loss_weight: float = 5.0
    # Highest timestep for an image that precedes its caption, so the caption can still read it.
    image_first_max_timestep: int = 500
    # Per-image weight of the noise-prediction error by timestep: uniform (the paper, DDPM's L_simple) or min_snr
    # (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting": min(SNR(t), gamma) / SNR(t) for
    # epsilon prediction, which stops the many easy low-noise steps from dominating; reported ~3x faster).
    loss_weighting: Literal["uniform", "min_snr"] = "uniform"
    min_snr_gamma: float = 5.0
    # Density of training timesteps for images that do not precede their caption: uniform (the paper, DDPM) or
    # logit_normal (Esser et al. 2024, SD3: t/T = sigmoid(n), n ~ N(logit_mean, logit_std)); a positive mean
    # spends more samples at high noise, where which digit to draw is decided. Image-first images stay uniform
    # under image_first_max_timestep.
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self) -> None:
        self.args()  # DiffusionArgs validates what a saved model carries
        _require(self.loss_weight >= 0, f"loss_weight: must be >= 0, got {self.loss_weight}")
        _require(self.loss_weighting in ("uniform", "min_snr"),
                 f"loss_weighting: must be uniform or min_snr, got {self.loss_weighting!r}")
        _require(self.min_snr_gamma > 0, f"min_snr_gamma: must be > 0, got {self.min_snr_gamma}")
        _require(self.timestep_sampling in ("uniform", "logit_normal"),
                 f"timestep_sampling: must be uniform or logit_normal, got {self.timestep_sampling!r}")
        _require(self.logit_std > 0, f"logit_std: must be > 0, got {self.logit_std}")
        _require(
            0 <= self.image_first_max_timestep < self.num_train_timesteps,
            f"image_first_max_timestep: must be in [0, {self.num_train_timesteps}), "
            f"got {self.image_first_max_timestep}",
        )

    def args(self) -> DiffusionArgs:
        """The part a trained model carries (saved in its fusion_config.json)."""
        return DiffusionArgs(self.num_train_timesteps, self.beta_schedule, self.prediction_type)


@dataclass
class OptimConfig:
    """AdamW with decoupled text/image learning rates; lr_text = 0 freezes the text path."""

    lr_text: float = 0.0
    lr_image: float = 1e-4
    # Floor of the cosine decay for the image group; the text group decays by the same ratio.
    lr_min_image: float = 1.5e-5
    warmup_steps: int = 4000
    total_steps: int = 250_000
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    # The U-Net down/up samplers start from scratch while the rest of the image set starts from pretrained
    # weights: their peak lr is lr_image * unet_lr_scale (1 = the paper's single image lr).
    unet_lr_scale: float = 1.0
    # torch's AdamW kernel: fused (one kernel over all tensors; on CPU measured 4x faster than for_loop, the CPU
    # default, for the demo's ~330 tensors), foreach, or for_loop. Same update up to float rounding.
    implementation: Literal["fused", "foreach", "for_loop"] = "fused"

    def __post_init__(self) -> None:
        _require(self.lr_text >= 0, f"lr_text: must be >= 0, got {self.lr_text}")
        _require(self.unet_lr_scale > 0, f"unet_lr_scale: must be > 0, got {self.unet_lr_scale}")
        _require(self.lr_image > 0, f"lr_image: must be > 0, got {self.lr_image}")
        _require(
            0 <= self.lr_min_image <= self.lr_image,
            f"lr_min_image: must be in [0, lr_image={self.lr_image}], got {self.lr_min_image}",
        )
        _require(self.warmup_steps >= 0, f"warmup_steps: must be >= 0, got {self.warmup_steps}")
        _require(
            self.total_steps > self.warmup_steps,
            f"total_steps: must exceed warmup_steps={self.warmup_steps}, got {self.total_steps}",
        )
        _require(0 <= self.beta1 < 1, f"beta1: must be in [0, 1), got {self.beta1}")
        _require(0 <= self.beta2 < 1, f"beta2: must be in [0, 1), got {self.beta2}")
        _require(self.eps > 0, f"eps: must be > 0, got {self.eps}")
        _require(self.weight_decay >= 0, f"weight_decay: must be >= 0, got {self.weight_decay}")


@dataclass
class DataConfig(LoaderSettings):
    """The streaming loader over precomputed latent shards: where they are, the tokenizer, and the loader's own
    settings (max_len, caption_first_prob, shuffle_buffer, seed, num_workers, resample_shards: see
    data_pipeline/loader.py LoaderSettings, which validates them)."""

    # Directory written by `megafusion precompute-latents` (holds index.json and shard-*.tar).
    shards: str = ""
    # Tokenizer directory or file; empty means the base model's directory.
    tokenizer: str = ""


@dataclass
class TrainConfig:
    """The training run: DeepSpeed engine settings, checkpoints, logging, guards."""

    output_dir: str = "runs/default"
    # deepspeed: ZeRO 0-3 data parallel (the default). torch: PyTorch-native tensor parallel x FSDP2 data parallel
    # (the `parallel` section), for bases whose frozen text copy plus image copy do not fit one device.
    engine: Literal["deepspeed", "torch"] = "deepspeed"
    # Sequences per rank per micro-step; global batch = micro_batch_size x grad_accum_steps x world size.
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    # 0 = optim.total_steps (a shorter run keeps the full LR schedule's shape).
    max_steps: int = 0
    zero_stage: int = 2
    # Optional DeepSpeed JSON (e.g. configs/deepspeed/zero3.json); its keys override the generated config.
    deepspeed_config: str = ""
    # auto: bf16 where this device multiplies bf16 clearly faster than fp32 (measured on CPU), else fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    grad_clip: float = 1.0
    activation_checkpointing: bool = False
    # Rows no trainable parameter reaches (with the text path frozen: text before the first image or BOI/EOI of
    # its document) run without autograd; gradients unchanged (model/frozen_rows.py). Off = the full computation.
    skip_frozen_rows: bool = True
    # When nothing trainable reaches those rows' loss (a frozen BOI/EOI head) it is skipped too; compute it for the
    # log every N-th micro-batch (0 = never).
    frozen_loss_every: int = 0
    log_every: int = 1
    save_every: int = 1000
    keep_last: int = 3
    resume: bool = True
    # Resume even though data.shards changed since the checkpoint (its epoch order then restarts).
    allow_data_change: bool = False
    # K non-finite losses in a row stop the run; each one alone is skipped and counted.
    max_nonfinite_in_a_row: int = 5
    # Peak dense TFLOP/s of one device (benchmarks/matmul_peak.py measures it); 0 = do not report MFU.
    peak_tflops: float = 0.0
    wandb: Literal["off", "offline", "online"] = "off"
    wandb_project: str = "megafusion"
    seed: int = 0
    # > 0: torch.profiler around that optimizer step, written to <output_dir>/profile/ (table + Chrome trace).
    profile_step: int = 0
    # > 0: keep an exponential moving average of the trainable weights with this decay (training/ema.py), saved
    # in every checkpoint; `megafusion export` writes the average (--raw-weights: the last step's). 0 = off.
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        _require(self.micro_batch_size >= 1, f"micro_batch_size: must be >= 1, got {self.micro_batch_size}")
        _require(self.grad_accum_steps >= 1, f"grad_accum_steps: must be >= 1, got {self.grad_accum_steps}")
        _require(self.max_steps >= 0, f"max_steps: must be >= 0, got {self.max_steps}")
        _require(self.zero_stage in (0, 1, 2, 3), f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        _require(self.grad_clip >= 0, f"grad_clip: must be >= 0, got {self.grad_clip}")
        _require(self.log_every >= 1, f"log_every: must be >= 1, got {self.log_every}")
        _require(self.frozen_loss_every >= 0, f"frozen_loss_every: must be >= 0, got {self.frozen_loss_every}")
        _require(self.save_every >= 1, f"save_every: must be >= 1, got {self.save_every}")
        _require(self.keep_last >= 1, f"keep_last: must be >= 1, got {self.keep_last}")
        _require(
            self.max_nonfinite_in_a_row >= 1,
            f"max_nonfinite_in_a_row: must be >= 1, got {self.max_nonfinite_in_a_row}",
        )
        _require(self.peak_tflops >= 0, f"peak_tflops: must be >= 0, got {self.peak_tflops}")
        _require(self.profile_step >= 0, f"profile_step: must be >= 0, got {self.profile_step}")
        _require(0 <= self.ema_decay < 1, f"ema_decay: must be in [0, 1) (0 = off), got {self.ema_decay}")
        # ZeRO-3 leaves each rank an empty placeholder per parameter outside its module's forward.
        _require(not (self.ema_decay > 0 and self.engine == "deepspeed" and self.zero_stage == 3),
                 "ema_decay: not supported with zero_stage 3 (each rank holds only its shard of the weights); "
                 "use zero_stage 0-2, or train.engine: torch, whose FSDP2 shards are averaged in place")


@dataclass
class ParallelConfig:
    """Degrees of the torch engine's device mesh (dp_replicate x dp_shard x tp = world size), torchtitan-style:
    tp shards every routed projection of both weight sets inside a node, dp_shard is FSDP2 full sharding,
    dp_replicate > 1 makes it hybrid (replicate across nodes x shard within); pp splits the layers into pipeline
    stages (outermost). cp is not implemented."""

    # Tensor-parallel degree: must divide the query heads, key/value heads and the FFN width.
    tp: int = 1
    # FSDP2 shard degree; -1 = whatever the world size leaves after tp and dp_replicate.
    dp_shard: int = -1
    dp_replicate: int = 1
    # Pipeline stages (torch engine; megafusion/parallel/pipeline.py): world size = pp x dp_replicate x dp_shard x
    # tp. pp_schedule: gpipe | 1f1b | interleaved_1f1b (two stages per rank); pp_microbatches per schedule call
    # (0 = train.grad_accum_steps, which it must divide); pp_layers: layers per stage, first to last (empty = even).
    pp: int = 1
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"
    pp_microbatches: int = 0
    pp_layers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require(self.pp >= 1, f"pp: must be >= 1, got {self.pp}")
        _require(self.pp_microbatches >= 0, f"pp_microbatches: must be >= 0, got {self.pp_microbatches}")
        _require(all(n >= 1 for n in self.pp_layers), f"pp_layers: every stage needs >= 1 layer, got {self.pp_layers}")
        _require(self.tp >= 1, f"tp: must be >= 1, got {self.tp}")
        _require(self.dp_shard == -1 or self.dp_shard >= 1, f"dp_shard: must be -1 (auto) or >= 1, got {self.dp_shard}")
        _require(self.dp_replicate >= 1, f"dp_replicate: must be >= 1, got {self.dp_replicate}")


@dataclass
class MegaFusionConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
