"""Hybrid-mask attention on CPU: compiled FlexAttention (mask from ids) against SDPA with the dense boolean mask,
and the fraction of tiles the Triton kernel skips, for packed 1k and 4k token sequences with 256-token images.

    python benchmarks/attention_kernels.py [--lengths 1024 4096 --repeats 5 --heads 9 --kv-heads 3 --head-dim 64]

What is measured (forward only, no autograd: the compiled CPU FlexAttention kernel has no backward):
* time: median wall time of one attention call over --repeats calls, SDPA and flex interleaved so machine noise
  hits both alike; mask construction is timed separately (done once per batch, shared by all layers);
* memory: (a) the mask each backend keeps for the whole forward, counted exactly (SDPA: the (B, S, S) bool tensor;
  flex: every tensor of the BlockMask); (b) the peak of torch CPU allocations during one attention call, from
  the profiler's allocation events (outputs and temporaries that go through torch's allocator; scratch memory a
  compiled kernel takes with plain malloc is not seen, so (b) is a lower bound for flex);
* tiles: the TileMap the Triton kernel launches with (same code, tile_map.py): fraction of tile pairs skipped and
  computed without an element mask, beside the fraction of (query, key) pairs the mask allows.
Layout: documents packed back to back, alternating caption-first (text, BOI, 256 image tokens, EOI, text) and
image-first (BOI, image, EOI, caption), as the data pipeline packs them; GQA at SmolLM2-135M's shape by default.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megafusion.kernels.flex import flex_layout  # noqa: E402
from megafusion.kernels.tile_map import build_tile_map  # noqa: E402
from megafusion.model.attention import flex_attention, sdpa_attention  # noqa: E402
from megafusion.model.hybrid_mask import HybridMask  # noqa: E402
from megafusion.model.layout import TokenLayout  # noqa: E402

IMAGE_TOKENS = 256


def packed_layout(seq: int, caption: int = 40) -> TokenLayout:
    """One row of `seq` tokens: documents of (caption, BOI, image, EOI) or (BOI, image, EOI, caption) packed until
    full, the remainder a text-only document."""
    modality: list[int] = []
    docs: list[int] = []
    doc = 0
    while True:
        image = [0] + [1] * IMAGE_TOKENS + [0]
        text = [0] * caption
        piece = text + image if doc % 5 != 4 else image + text  # 80% caption-first
        if len(modality) + len(piece) > seq:
            break
        modality += piece
        docs += [doc] * len(piece)
        doc += 1
    rest = seq - len(modality)
    modality += [0] * rest
    docs += [doc] * rest
    mod = torch.tensor([modality])
    return TokenLayout.build(torch.zeros_like(mod), mod, doc_ids=torch.tensor([docs]), tokens_per_image=IMAGE_TOKENS)


def peak_allocated(fn: Callable[[], object]) -> int:
    """Peak bytes of torch CPU allocations live at once during fn(), from the profiler's allocation events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def block_mask_bytes(block_mask) -> int:
    return sum(t.numel() * t.element_size() for t in block_mask.as_tuple() if isinstance(t, torch.Tensor))


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def mib(n: float) -> str:
    return f"{n / 2**20:8.2f} MiB"


def run(seq: int, args: argparse.Namespace) -> dict[str, float]:
    layout = packed_layout(seq)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, args.heads, seq, args.head_dim, generator=g)
    k = torch.randn(1, args.kv_heads, seq, args.head_dim, generator=g)
    v = torch.randn(1, args.kv_heads, seq, args.head_dim, generator=g)

    dense_mask = HybridMask(layout)
    t_dense_mask = timed(dense_mask.dense)
    dense_bytes = dense_mask.dense().numel() * dense_mask.dense().element_size()
    ids = (layout.doc_ids, layout.image_ids, layout.doc_ids, layout.image_ids)
    t_block_mask = timed(lambda: flex_layout(*ids))
    flex_mask = HybridMask(layout)  # the backend caches its BlockMask on this object, as in a forward
    t_compile = timed(lambda: flex_attention(q, k, v, flex_mask))
    fl = flex_layout(*ids)
    flex_bytes = block_mask_bytes(fl.block_mask)

    with torch.no_grad():
        ref = sdpa_attention(q, k, v, dense_mask)
        err = float((flex_attention(q, k, v, flex_mask) - ref).abs().max() / ref.abs().max())
        t_sdpa, t_flex = [], []
        for _ in range(args.repeats):
            t_sdpa.append(timed(lambda: sdpa_attention(q, k, v, dense_mask)))
            t_flex.append(timed(lambda: flex_attention(q, k, v, flex_mask)))
        peak_sdpa = peak_allocated(lambda: sdpa_attention(q, k, v, dense_mask))
        peak_flex = peak_allocated(lambda: flex_attention(q, k, v, flex_mask))

    density = float(dense_mask.dense().float().mean())
    sdpa_s, flex_s = statistics.median(t_sdpa), statistics.median(t_flex)
    print(f"\n== {seq} tokens: {layout.num_images} images of {IMAGE_TOKENS} tokens, "
          f"{int(layout.doc_ids.max()) + 1} documents; {args.heads} query / {args.kv_heads} KV heads, "
          f"head_dim {args.head_dim}; mask density {density:.3f}")
    print(f"  mask build (once per batch)  SDPA dense {t_dense_mask * 1e3:8.1f} ms   flex BlockMask "
          f"{t_block_mask * 1e3:8.1f} ms   (flex first call incl. compile {t_compile:.1f} s)")
    print(f"  attention time (median)      SDPA {sdpa_s * 1e3:8.1f} ms   flex {flex_s * 1e3:8.1f} ms   "
          f"flex/SDPA = {flex_s / sdpa_s:.2f}x")
    print(f"  mask kept for the forward    SDPA {mib(dense_bytes)}   flex {mib(flex_bytes)}   "
          f"flex/SDPA = {flex_bytes / dense_bytes:.4f}x")
    print(f"  peak alloc during one call   SDPA {mib(peak_sdpa)}   flex {mib(peak_flex)}   "
          f"flex/SDPA = {peak_flex / max(peak_sdpa, 1):.2f}x")
    total_sdpa, total_flex = dense_bytes + peak_sdpa, flex_bytes + peak_flex
    print(f"  mask + call peak             SDPA {mib(total_sdpa)}   flex {mib(total_flex)}   "
          f"flex/SDPA = {total_flex / total_sdpa:.2f}x")
    print(f"  flex vs SDPA max relative difference {err:.1e}")
    for block in (64, 128):
        tiles = build_tile_map(*ids, block, block)
        skipped, full = tiles.skipped_fraction(), tiles.full_fraction()
        print(f"  triton tiles {block}x{block}: {tiles.num_tiles:5d} tile pairs, skipped {skipped:.3f}, "
              f"unmasked (full) {full:.3f}, masked {1 - skipped - full:.3f}  "
              f"(computed {1 - skipped:.3f} vs allowed pairs {density:.3f})")
    return {"seq": seq, "time_ratio": flex_s / sdpa_s, "mem_ratio": total_flex / total_sdpa}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch 1, forward only")
    start = time.perf_counter()
    results = [run(seq, args) for seq in args.lengths]
    print("\nsummary (flex compiled / SDPA dense mask):")
    for r in results:
        print(f"  {r['seq']:5d} tokens: time {r['time_ratio']:.2f}x, memory (mask + call peak) {r['mem_ratio']:.2f}x")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
