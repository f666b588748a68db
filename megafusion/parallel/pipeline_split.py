"""The pipeline plan of a run: how many stages, which layers each holds, which schedule, how many micro-batches.

Pure arithmetic on the config and the model's layer count, so a bad `parallel.pp*` setting is refused with a
message naming its keys before any process group or model exists."""

from __future__ import annotations

from dataclasses import dataclass

PP_SCHEDULES: tuple[str, ...] = ("gpipe", "1f1b", "interleaved_1f1b")
# Interleaved 1F1B gives each rank several non-adjacent stages ("loop" placement): rank r holds stages r, r + pp.
STAGES_PER_RANK = {"gpipe": 1, "1f1b": 1, "interleaved_1f1b": 2}


@dataclass(frozen=True)
class PipelinePlan:
    """pp ranks; stage_layers[s] = the global layer indices of (virtual) stage s; microbatches per schedule call."""

    pp: int
    schedule: str
    microbatches: int
    stage_layers: tuple[tuple[int, ...], ...]

    @property
    def num_stages(self) -> int:
        return len(self.stage_layers)

    @property
    def stages_per_rank(self) -> int:
        return self.num_stages // self.pp

    def stages_of_rank(self, pp_rank: int) -> list[int]:
        return [pp_rank + k * self.pp for k in range(self.stages_per_rank)]

    def rank_of_stage(self, stage: int) -> int:
        return stage % self.pp


def even_split(num_layers: int, num_stages: int) -> list[int]:
    """Layer counts per stage, as even as possible. The first stage also runs the embedding and the U-Net down and
    the last the LM head and the U-Net up, so the remainder goes to the stages in between first."""
    counts = [num_layers // num_stages] * num_stages
    order = list(range(1, num_stages - 1)) + [0, num_stages - 1] if num_stages > 2 else list(range(num_stages))
    for s in order[: num_layers % num_stages]:
        counts[s] += 1
    return counts


def check_pipeline_engine(pp: int, engine: str) -> None:
    if pp > 1 and engine != "torch":
        raise ValueError(
            f"parallel.pp ({pp}) needs train.engine: torch (got train.engine: {engine}); DeepSpeed's pipeline "
            "engine trains with ZeRO-1 only and cannot hold the torch engine's DTensor weights"
        )


def plan_pipeline(*, pp: int, schedule: str, microbatches: int, pp_layers: list[int] | tuple[int, ...],
                  num_layers: int, grad_accum_steps: int, engine: str) -> PipelinePlan:
    """Checks the pipeline settings against each other, the engine and the model; raises ValueError naming the
    keys. microbatches: parallel.pp_microbatches (0 = train.grad_accum_steps): each optimizer step runs
    grad_accum_steps / microbatches schedule calls of that many micro-batches on every data-parallel rank."""
    if pp < 1:
        raise ValueError(f"parallel.pp: must be >= 1, got {pp}")
    if schedule not in PP_SCHEDULES:
        raise ValueError(f"parallel.pp_schedule: must be one of {list(PP_SCHEDULES)}, got {schedule!r}")
    check_pipeline_engine(pp, engine)
    if pp == 1:
        if pp_layers and list(pp_layers) != [num_layers]:
            raise ValueError(f"parallel.pp_layers ({list(pp_layers)}) needs parallel.pp > 1 (got parallel.pp: 1)")
        return PipelinePlan(1, schedule, grad_accum_steps, (tuple(range(num_layers)),))
    m = microbatches or grad_accum_steps
    if grad_accum_steps % m:
        raise ValueError(
            f"parallel.pp_microbatches ({m}) must divide train.grad_accum_steps ({grad_accum_steps}): each optimizer "
            "step runs whole pipeline schedules"
        )
    if m < pp:
        raise ValueError(
            f"parallel.pp_microbatches ({m}) must be >= parallel.pp ({pp}) (set train.grad_accum_steps >= "
            f"{pp}): with fewer micro-batches than stages some stage idles through the whole step"
        )
    per_rank = STAGES_PER_RANK[schedule]
    if per_rank > 1 and m % pp:
        raise ValueError(
            f"parallel.pp_microbatches ({m}) must be a multiple of parallel.pp ({pp}) for parallel.pp_schedule: "
            f"{schedule} (micro-batches go round the stages in rounds of pp)"
        )
    num_stages = pp * per_rank
    if num_stages > num_layers:
        raise ValueError(
            f"parallel.pp ({pp}) x {per_rank} stage(s) per rank (parallel.pp_schedule: {schedule}) = {num_stages} "
            f"stages, but the model has only {num_layers} layers (each stage needs at least one)"
        )
    if pp_layers:
        counts = list(pp_layers)
        if len(counts) != num_stages or sum(counts) != num_layers or min(counts) < 1:
            raise ValueError(
                f"parallel.pp_layers ({counts}) must give {num_stages} stages (parallel.pp {pp} x {per_rank} per "
                f"rank for parallel.pp_schedule: {schedule}) at least one layer each, {num_layers} layers in all"
            )
    else:
        counts = even_split(num_layers, num_stages)
    stages, start = [], 0
    for n in counts:
        stages.append(tuple(range(start, start + n)))
        start += n
    return PipelinePlan(pp, schedule, m, tuple(stages))


def max_images_per_row(max_len: int, tokens_per_image: int) -> int:
    """Most images a packed row of max_len tokens can hold (each costs its tokens plus BOI and EOI): the fixed
    image count every pipeline micro-batch is padded to, per row."""
    return max_len // (tokens_per_image + 2)


__all__ = ["PP_SCHEDULES", "PipelinePlan", "check_pipeline_engine", "even_split", "max_images_per_row", "plan_pipeline"]
