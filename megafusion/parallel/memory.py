"""Per-GPU training memory of a LlamaFusion run under a parallel layout: model states and activations.

Pure arithmetic on parameter counts and tensor shapes; `megafusion.training.plan` builds the counts from the model
on the meta device and prints the result. All sizes are bytes. What this accounting leaves out (the CUDA context,
communication buckets, allocator fragmentation, transient copies inside kernels) is what a planner's margin is for.

Model states, bf16 mixed precision with AdamW; F = frozen parameters (no gradient, no optimizer state: the text
group when optim.lr_text = 0), T = trainable parameters, N = data-parallel GPUs, L = the largest module's
parameters:

DeepSpeed engine (the module is cast to bf16, frozen weights included; only T enters the optimizer). The
per-parameter bytes are those of DeepSpeed's own estimators (runtime/zero/stage_1_and_2.py and stage3.py), so
with F = 0 the totals equal `estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs`
(no offload), which tests/training/test_plan.py checks:

    stage | frozen | weights | grads       | optimizer | gathered
    0     | 2F     | 2T      | (2 + 4)T    | 12T       | -
    1     | 2F     | 2T      | 2T + 4T/N   | 12T/N     | -
    2     | 2F     | 2T      | (2 + 4)T/N  | 12T/N     | -
    3     | 2F/N   | 2T/N    | 4T/N        | 12T/N     | 4L

grads: the bf16 gradients (2) and the fp32 copy the optimizer steps on (4); optimizer: fp32 master + Adam m and v
(12). ZeRO-3 partitions frozen weights too; DeepSpeed budgets it 18 bytes per partitioned trainable parameter and
4 bytes per parameter of the largest module, which it gathers whole.

Torch engine (megafusion.parallel: tp x FSDP2 full shard over dp = N / tp), torchtitan's mixed precision:
trainable parameters are stored sharded in fp32 (they are the master copy), gathered in bf16 for compute,
gradients reduce-scattered into fp32 shards; frozen weights are stored in bf16 (`frozen_bytes`: they need no
master copy). Tensor parallel divides the routed projections and an untied embedding / LM head by tp; norms,
U-Nets and BOI/EOI rows are replicated over tp. With f, t = one tp rank's share of F, T:

    frozen 2f/dp | weights 4t/dp | grads 4t/dp | optimizer 8t/dp
    gathered: the root unit (embeddings, heads, U-Nets: kept gathered from the start of forward to the end of
              backward) in bf16 + two blocks in bf16 (the running one and the prefetched next) + the bf16
              gradients of one unit's trainable part and their fp32 copy for the reduce-scatter (6 bytes each).

Activations (bf16, per token per layer; Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", arXiv 2205.05198, sec. 4, counts a GPT layer as 34 s*b*h + 5 a*s^2*b bytes; this is the same
count redone for this model's eager autograd graph, exact against the tensors autograd saves, see the test).
h = hidden size, q = query width (heads x head_dim), kv = key/value width, f = FFN width, a = heads, S = sequence
length, t = tp. A routed set with trainable weights saves its linears' inputs (for the weight gradient), a frozen
set does not (its input gradient needs only the weight); everything else is saved either way:

    per row, not divided by tp (no sequence parallelism):
        each of the 2 RMSNorms: 4h (fp32 copy of its input) + 4 (fp32 rsqrt) + 2h (normalised, if trainable)
        Q/K/V input 2h and gate/up input 2h        (trainable sets only)
    per row, divided by tp:
        SwiGLU 3 x 2f (gate output for SiLU, SiLU output and up output for the product)
        down input 2f                              (trainable sets only)
    per token, divided by tp:
        attention 2(q + kv) (Q and K after RoPE) + 2(q + 2kv) (the Q/K/V buffer V is a view of)
                  + 2q (output) + 4a (log-sum-exp), as a FlashAttention-type kernel saves them (no S x S)
        O input 2q                                 (if any row's O set is trainable: one grouped tensor)
    per token, attention `sdpa` with images present (text alone runs causal, maskless): 2S, the S x S bf16 mask
        bias its memory-efficient kernel keeps per layer
        (attention `triton` / `auto` on CUDA keeps none; should PyTorch pick its math kernel instead, it also keeps
        the S x S probabilities of every head, and this estimate is far too low).

For Llama-3 8B (h = q = 4096, kv = 1024, f = 14336, a = 32) in a micro-batch of text and images, without the sdpa
term, that is 214 KiB for an image token (trainable set) and 154 KiB for a frozen text token per layer, against
Megatron's 34h = 136 KiB for a GPT layer with a 4h MLP.

With activation checkpointing (per FusionBlock) each layer keeps only its input, 2h per token (Megatron's 2sbh
per layer for full recomputation), and backward recomputes one layer at a time. Not checkpointed: the U-Nets
(`unet_bytes_per_image`, measured by the caller on the meta device) and the loss: at the cross-entropy the bf16
logits, their fp32 copy and the fp32 log-softmax output coexist, 10 bytes per vocabulary entry per text token,
not divided by tp (the LM head's logits are all-gathered). Left out: the embedding output and final norms (less
than one layer's worth).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GIB = 2**30
BF16, FP32 = 2, 4
# Per trainable parameter under DeepSpeed: fp32 master + Adam m + v, and the fp32 gradient copy.
DS_OPTIM, DS_FP32_GRAD = 12, 4
# Torch engine per trainable parameter: fp32 parameter (master), fp32 gradient shard, Adam m + v.
TORCH_WEIGHT, TORCH_GRAD, TORCH_OPTIM = 4, 4, 8
# Bytes saved per gathered parameter of DeepSpeed ZeRO-3's largest module (estimate_zero3_model_states_mem_needs).
DS_Z3_LARGEST_LAYER = 4
# bf16 logits + fp32 copy + fp32 log-softmax output at the cross-entropy, per vocabulary entry.
LOGITS_BYTES = BF16 + FP32 + FP32


@dataclass(frozen=True)
class ParamSplit:
    """Parameter counts by whether AdamW updates them and whether tensor parallelism shards them."""

    frozen_tp: int = 0
    frozen_rep: int = 0
    trainable_tp: int = 0
    trainable_rep: int = 0

    @property
    def frozen(self) -> int:
        return self.frozen_tp + self.frozen_rep

    @property
    def trainable(self) -> int:
        return self.trainable_tp + self.trainable_rep

    @property
    def total(self) -> int:
        return self.frozen + self.trainable

    def per_tp_rank(self, tp: int) -> tuple[float, float]:
        """(frozen, trainable) parameters one tensor-parallel rank holds before data-parallel sharding."""
        return self.frozen_tp / tp + self.frozen_rep, self.trainable_tp / tp + self.trainable_rep

    def __add__(self, other: ParamSplit) -> ParamSplit:
        return ParamSplit(self.frozen_tp + other.frozen_tp, self.frozen_rep + other.frozen_rep,
                          self.trainable_tp + other.trainable_tp, self.trainable_rep + other.trainable_rep)

    def all_trainable(self) -> ParamSplit:
        """The same parameters with nothing frozen (plain ZeRO, what DeepSpeed's estimators assume)."""
        return ParamSplit(0, 0, self.frozen_tp + self.trainable_tp, self.frozen_rep + self.trainable_rep)


@dataclass(frozen=True)
class ModelParams:
    """What the layouts need to know about a model's parameters."""

    total: ParamSplit
    # The torch engine's FSDP2 units: the largest FusionBlock, and the root (everything outside the blocks).
    block: ParamSplit
    root: ParamSplit
    # DeepSpeed's "largest layer": the most parameters held directly by one module (ZeRO-3 gathers per module).
    largest_module: int

    def all_trainable(self) -> ModelParams:
        return replace(self, total=self.total.all_trainable(), block=self.block.all_trainable(),
                       root=self.root.all_trainable())


@dataclass(frozen=True)
class Layout:
    engine: str  # "deepspeed" (ZeRO over all GPUs) or "torch" (tp x FSDP2 full shard)
    zero_stage: int  # deepspeed: 0-3; torch: 3 (FSDP2 shards weights, gradients and optimizer state)
    tp: int
    dp: int

    @property
    def name(self) -> str:
        if self.engine == "deepspeed":
            return f"deepspeed zero-{self.zero_stage} dp{self.dp}"
        return f"torch tp{self.tp} x fsdp{self.dp}" if self.dp > 1 else f"torch tp{self.tp}"

    @property
    def overrides(self) -> str:
        """The run-config overrides that select this layout."""
        if self.engine == "deepspeed":
            return f"--train.engine=deepspeed --train.zero_stage={self.zero_stage}"
        return f"--train.engine=torch --parallel.tp={self.tp} --parallel.dp_shard=-1"


@dataclass(frozen=True)
class ModelStates:
    """Per-GPU bytes of weights, gradients and optimizer state."""

    frozen: float
    weights: float
    grads: float
    optimizer: float
    # Parameters (and their unsharded gradients) gathered transiently by ZeRO-3 / FSDP2.
    gathered: float = 0.0

    @property
    def total(self) -> float:
        return self.frozen + self.weights + self.grads + self.optimizer + self.gathered


def deepspeed_states(params: ModelParams, stage: int, num_gpus: int) -> ModelStates:
    """DeepSpeed ZeRO `stage` data parallel over `num_gpus` (table in the module docstring)."""
    f, t, n = params.total.frozen, params.total.trainable, num_gpus
    if stage == 0:
        return ModelStates(BF16 * f, BF16 * t, (BF16 + DS_FP32_GRAD) * t, DS_OPTIM * t)
    if stage == 1:
        return ModelStates(BF16 * f, BF16 * t, BF16 * t + DS_FP32_GRAD * t / n, DS_OPTIM * t / n)
    if stage == 2:
        return ModelStates(BF16 * f, BF16 * t, (BF16 + DS_FP32_GRAD) * t / n, DS_OPTIM * t / n)
    if stage == 3:
        return ModelStates(BF16 * f / n, BF16 * t / n, DS_FP32_GRAD * t / n, DS_OPTIM * t / n,
                           DS_Z3_LARGEST_LAYER * params.largest_module)
    raise ValueError(f"zero stage must be 0-3, got {stage}")


def torch_states(params: ModelParams, tp: int, dp: int, frozen_bytes: int = BF16) -> ModelStates:
    """The torch engine: tp-way tensor parallel x dp-way FSDP2 full sharding (module docstring)."""
    frozen, trainable = params.total.per_tp_rank(tp)
    root_f, root_t = params.root.per_tp_rank(tp)
    block_f, block_t = params.block.per_tp_rank(tp)
    gathered = 0.0
    if dp > 1:  # without FSDP nothing is sharded, so nothing is gathered
        gathered = BF16 * (root_f + root_t) + 2 * BF16 * (block_f + block_t) + (BF16 + FP32) * max(root_t, block_t)
    return ModelStates(frozen_bytes * frozen / dp, TORCH_WEIGHT * trainable / dp, TORCH_GRAD * trainable / dp,
                       TORCH_OPTIM * trainable / dp, gathered)


def layout_states(layout: Layout, params: ModelParams) -> ModelStates:
    if layout.engine == "deepspeed":
        return deepspeed_states(params, layout.zero_stage, layout.dp)
    return torch_states(params, layout.tp, layout.dp)


@dataclass(frozen=True)
class ActivationShape:
    """The shapes the activation count needs (see the module docstring for the formula)."""

    hidden: int
    q_dim: int
    kv_dim: int
    ffn: int
    heads: int
    layers: int
    # LM head rows the loss runs over (base vocabulary + BOI/EOI).
    vocab: int
    seq_len: int
    tokens_per_image: int
    # Do the sets a text row / an image row runs through hold trainable weights? (deep: text / image sets; ffn and
    # none: the shared sets of the text group serve image rows too.)
    text_attn_trainable: bool
    text_ffn_trainable: bool
    image_attn_trainable: bool
    image_ffn_trainable: bool
    # Saved activations of both U-Nets for one image (measured, bf16).
    unet_bytes_per_image: float = 0.0
    # attention `sdpa` keeps an S x S mask bias per layer; the FlashAttention-type kernels do not.
    dense_mask: bool = False
    # routing `triton` (grouped GEMM) saves projection inputs of frozen sets too.
    grouped_gemm: bool = False
    # Bytes per activation element (2: bf16; 4 for an fp32 run, as the CPU test measures).
    act_bytes: int = BF16


def _norm_bytes(shape: ActivationShape, trainable: bool) -> float:
    # RMSNorm upcasts to fp32 (in an fp32 run that copy is the input itself), keeps the fp32 rsqrt, and the
    # weight multiply keeps the normalised tensor only when the weight needs a gradient.
    return FP32 * shape.hidden + FP32 + (shape.act_bytes * shape.hidden if trainable else 0)


def row_bytes(shape: ActivationShape, image: bool, tp: int = 1) -> float:
    """Saved bytes of one layer for one text (image=False) or image row, without the per-token shared part."""
    b, h, f = shape.act_bytes, shape.hidden, shape.ffn
    attn = shape.image_attn_trainable if image else shape.text_attn_trainable
    ffn = shape.image_ffn_trainable if image else shape.text_ffn_trainable
    keeps_attn_in = attn or (shape.grouped_gemm and tp == 1)
    keeps_ffn_in = ffn or (shape.grouped_gemm and tp == 1)
    replicated = _norm_bytes(shape, attn) + _norm_bytes(shape, ffn)
    replicated += b * h * (int(keeps_attn_in) + int(keeps_ffn_in))
    sharded = 3 * b * f + (b * f if keeps_ffn_in else 0)
    return replicated + sharded / tp


def shared_bytes(shape: ActivationShape, image_fraction: float, tp: int = 1) -> float:
    """Saved bytes of one layer per token for what all rows share: attention (sequence order) and the O input."""
    b, q, kv = shape.act_bytes, shape.q_dim, shape.kv_dim
    attention = b * (q + kv) + b * (q + 2 * kv) + b * q + FP32 * shape.heads
    o_trainable = (image_fraction < 1 and shape.text_attn_trainable) or (
        image_fraction > 0 and shape.image_attn_trainable) or (shape.grouped_gemm and tp == 1)
    sharded = attention + (b * q if o_trainable else 0)
    mask = b * shape.seq_len if shape.dense_mask and image_fraction > 0 else 0
    return sharded / tp + mask


def layer_bytes_per_token(shape: ActivationShape, image_fraction: float, tp: int = 1) -> float:
    """Saved bytes of one layer per token of a micro-batch with `image_fraction` image tokens."""
    rows = (1 - image_fraction) * row_bytes(shape, False, tp) + image_fraction * row_bytes(shape, True, tp)
    return rows + shared_bytes(shape, image_fraction, tp)


@dataclass(frozen=True)
class Activations:
    """Peak saved activations of one micro-batch on one GPU, without and with activation checkpointing."""

    layers: float
    layers_checkpointed: float
    unet: float
    logits: float

    @property
    def total(self) -> float:
        return self.layers + self.unet + self.logits

    @property
    def total_checkpointed(self) -> float:
        return self.layers_checkpointed + self.unet + self.logits


def activations(shape: ActivationShape, tokens: int, image_fraction: float, tp: int = 1) -> Activations:
    """`tokens` per micro-batch per data-parallel rank (every tp rank of a replica sees all of them)."""
    if not 0 <= image_fraction <= 1:
        raise ValueError(f"image fraction must be in [0, 1], got {image_fraction}")
    one_layer = tokens * layer_bytes_per_token(shape, image_fraction, tp)
    kept_inputs = shape.layers * tokens * shape.act_bytes * shape.hidden
    images = tokens * image_fraction / shape.tokens_per_image
    text_tokens = tokens * (1 - image_fraction)
    return Activations(
        layers=shape.layers * one_layer,
        layers_checkpointed=kept_inputs + one_layer,
        unet=images * shape.unet_bytes_per_image,
        logits=text_tokens * LOGITS_BYTES * shape.vocab,
    )


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    states: ModelStates
    activations: Activations

    @property
    def total(self) -> float:
        return self.states.total + self.activations.total

    @property
    def total_checkpointed(self) -> float:
        return self.states.total + self.activations.total_checkpointed

    def fits(self, budget: float) -> str:
        """'yes' (without activation checkpointing), 'ckpt' (only with it) or 'no'."""
        if self.total <= budget:
            return "yes"
        return "ckpt" if self.total_checkpointed <= budget else "no"


def tp_degrees(num_gpus: int, gpus_per_node: int, candidates: tuple[int, ...] = (1, 2, 4, 8)) -> list[int]:
    """tp degrees the GPU count allows: a tp group stays inside one node (its all-reduces are on the critical
    path) and must divide the GPUs. Whether the model's heads and FFN width divide is the caller's check."""
    return [tp for tp in candidates if tp <= gpus_per_node and num_gpus % tp == 0]


def candidate_layouts(num_gpus: int, tps: list[int]) -> list[Layout]:
    """DeepSpeed ZeRO 0-3 over all GPUs, then the torch engine at each allowed tp with FSDP2 over the rest."""
    layouts = [Layout("deepspeed", stage, 1, num_gpus) for stage in range(4)]
    layouts += [Layout("torch", 3, tp, num_gpus // tp) for tp in tps]
    return layouts


def estimate(layout: Layout, params: ModelParams, shape: ActivationShape, tokens: int,
             image_fraction: float) -> Estimate:
    return Estimate(layout, layout_states(layout, params), activations(shape, tokens, image_fraction, layout.tp))


def recommend(estimates: list[Estimate], budget: float) -> tuple[Estimate, bool] | None:
    """The recommended layout and whether it needs activation checkpointing, or None if nothing fits `budget`
    (the GPU memory less a margin for what this accounting leaves out: fragmentation, buffers, CUDA context).

    The rule, in order of what each step costs in throughput:
      1. fewest model-parallel (tensor-parallel) ranks: tp splits every matmul into smaller ones and puts two
         activation all-reduces per layer forward and two backward on the critical path, and tp > 1 needs the
         torch engine; ZeRO / FSDP sharding stays data parallel and its collectives overlap with compute;
      2. at that tp, no activation checkpointing: recomputing every layer adds a forward pass, about a third more
         layer FLOPs that nothing hides, while sharding one more kind of state costs communication that overlaps;
      3. the least sharding: ZeRO stage 0 < 1 < 2 (stage 2 reduce-scatters on every micro-step of gradient
         accumulation, stage 1 only at the step) < 3 / FSDP2 (weights gathered again for every forward and
         backward, 1.5x the traffic); at equal sharding the DeepSpeed engine, the default and the most tested.
    """
    def cost(e: Estimate) -> tuple[int, int]:
        return e.layout.zero_stage, int(e.layout.engine != "deepspeed")

    for tp in sorted({e.layout.tp for e in estimates}):
        at_tp = sorted((e for e in estimates if e.layout.tp == tp), key=cost)
        for checkpointing in (False, True):
            for e in at_tp:
                if (e.total_checkpointed if checkpointing else e.total) <= budget:
                    return e, checkpointing
    return None
