"""Variable token counts per input in a batch: which layout is fastest on CPU (threshold token gates).

Run from the repository root (about 4 minutes on one thread)::

    python benchmarks/token_layouts.py
    python benchmarks/token_layouts.py --batch 32 --rounds 8 --keep 0.7

``vit_small_patch16_224`` (random weights, seed 0, 224x224, fp32, eval, ``torch.inference_mode()``) with
``threshold`` gates (LTP) at blocks 3, 6, 9, calibrated with `calibrate_tokens_` on 16 other images to keep
``--keep`` of the arriving tokens per location. Images are Gaussian noise times a per-image contrast in
[0, 2), so the images of a batch keep very different numbers of tokens (the counts are printed). Variants,
timed interleaved round by round after warm-up; speed-up = median of the paired per-round ratios to dense:

* ``packed+pad``: kept tokens of all images packed into one (sum n_i, C) tensor for every token-wise op;
  attention padded to the longest image with a key-padding mask (one SDPA call);
* ``packed+loop``: the same, attention one SDPA call per image;
* ``padded (bound)``: option (b), everything padded to the longest image. Emulated by a ``cls_attention``
  (top-k, gathered) model that keeps exactly the per-location maximum count of the batch for every image: the
  token-wise work of a padded layout without its mask, so a lower bound of (b)'s time;
* ``per-image loop``: option (c), the threshold model called on one image at a time.

``--attention`` instead times the attention of one vit_small block alone on packed batches (6 heads of 64,
random counts uniform in [n/2, n] per image), ``"pad"`` against ``"loop"``, over a grid of batch sizes and
counts: the data behind `dynsparse.layers.token_pack.attention_mode`.

The FLOPs-ideal speed-up of each variant is ``torch.utils.flop_counter``'s count of dense over the
threshold model's run with attention ``"loop"`` (gates included): the kept tokens' work and nothing else. The
``"pad"`` attention also computes the padding (about 1 % more FLOPs at the defaults); counting that run made the
ideal smaller and every achieved / ideal larger (before 2026-11-25).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from dynsparse.commands.args import nonnegative_int, positive_int

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import count_flops, interleaved_rounds, markdown_table, paired_ratios, spread

BLOCKS = [3, 6, 9]


def images(n: int, seed: int) -> torch.Tensor:
    """Gaussian noise times a per-image contrast in [0, 2): images that keep different token counts."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 224, 224, generator=g) * (2 * torch.rand(n, 1, 1, 1, generator=g))


def build(keep: float):
    import timm

    import dynsparse as ds
    from dynsparse.layers.tokens import calibrate_tokens_

    torch.manual_seed(0)
    dense = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    dyn = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    dyn.load_state_dict(dense.state_dict())
    ds.sparsify_(dyn, {"tokens": {"gate": "threshold", "blocks": BLOCKS}})
    ds.set_budget_(dyn, keep)
    with torch.inference_mode():
        calibrate_tokens_(dyn, [images(16, 1)])
    return dense, dyn


def counts(dyn, x) -> list[list[int]]:
    """Tokens kept per image after each gate (prefix included), from a run of ``dyn``."""
    from dynsparse.layers.tokens import TokenGatedBlock

    seen: list[list[int]] = []

    def grab(mod, args, out):
        seen.append(list(mod._token_state.packing.lengths) if mod._token_state.packing else [out.shape[1]])

    hooks = [b.register_forward_hook(grab) for b in dyn.blocks if isinstance(b, TokenGatedBlock)]
    with torch.inference_mode():
        dyn(x)
    for h in hooks:
        h.remove()
    return seen


def padded_bound(dense, per_gate_max: list[int]):
    """A top-k model keeping, at every gate, the batch's maximum count for every image (option (b) bound)."""
    import copy

    import dynsparse as ds

    n, keeps = 196, []
    for k in per_gate_max:
        keeps.append((k - 1) / n)
        n = k - 1
    m = copy.deepcopy(dense)
    return ds.sparsify_(m, {"tokens": {"gate": "cls_attention", "blocks": BLOCKS, "keep": keeps}}).eval()


def attention_grid(rounds: int) -> None:
    """Time ``packed_attention`` ``"pad"`` vs ``"loop"`` on one vit_small block's attention."""
    import timm

    from dynsparse.layers.token_pack import Packing, packed_attention

    torch.manual_seed(0)
    attn = timm.create_model("vit_small_patch16_224", pretrained=False).blocks[0].attn.eval()
    rows = []
    for b in (2, 8, 32, 128):
        for n in (16, 64, 192):
            g = torch.Generator().manual_seed(b * n)
            pk = Packing(torch.randint(n // 2, n + 1, (b,), generator=g).tolist())
            h = torch.randn(1, pk.total, 384, generator=g)
            steps = {m: (lambda m=m, h=h, pk=pk: packed_attention(attn, h, pk, mode=m)) for m in ("pad", "loop")}
            with torch.inference_mode():
                t = interleaved_rounds(steps, rounds, 2)
            r = spread(paired_ratios(t.cpu["pad"], t.cpu["loop"]))
            pad, loop = (1e3 * spread(t.cpu[m]).median for m in ("pad", "loop"))
            rows.append([b, n, f"{pad:.2f}", f"{loop:.2f}", f"{r.median:.2f} ({r.q1:.2f}-{r.q3:.2f})"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    header = ["batch", "max tokens", "pad ms (CPU)", "loop ms (CPU)", "pad / loop time (IQR)"]
    print(markdown_table(header, rows, "rrrrr"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attention", action="store_true", help="time the attention strategies alone")
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--keep", type=float, default=0.7)
    p.add_argument("--rounds", type=positive_int, default=8)
    p.add_argument("--warmup", type=nonnegative_int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.attention:
        return attention_grid(args.rounds * 2)
    t0 = time.perf_counter()
    dense, dyn = build(args.keep)
    state = dyn.blocks[BLOCKS[0]]._token_state
    x = images(args.batch, 2)
    seen = counts(dyn, x)
    for i, c in zip(BLOCKS, seen, strict=True):
        print(f"# after block {i}: tokens per image min {min(c)}, mean {sum(c) / len(c):.1f}, max {max(c)}")
    bound = padded_bound(dense, [max(c) for c in seen])

    def run(mode):
        def step():
            state.attention = mode
            return dyn(x)

        return step

    steps = {
        "dense": lambda: dense(x),
        "packed+pad": run("pad"),
        "packed+loop": run("loop"),
        "padded (bound)": lambda: bound(x),
        "per-image loop": lambda: [dyn(x[i : i + 1]) for i in range(x.shape[0])],
    }
    with torch.inference_mode():
        state.attention = "loop"  # the FLOP-minimal run: no padded attention
        ideal = count_flops(dense, x) / count_flops(dyn, x)
        ideal_bound = count_flops(dense, x) / count_flops(bound, x)
        t = interleaved_rounds(steps, args.rounds, args.warmup)
    rows = []
    for name in steps:
        if name == "dense":
            continue
        r = spread(paired_ratios(t.wall["dense"], t.wall[name]))
        cpu = spread(paired_ratios(t.cpu["dense"], t.cpu[name]))
        rows.append(
            [
                name,
                args.batch,
                f"{1e3 * spread(t.wall[name]).median:.1f}",
                f"{r.median:.2f}x ({r.q1:.2f}-{r.q3:.2f})",
                f"{cpu.median:.2f}x",
                f"{ideal:.2f}x",
                f"{r.median / ideal:.2f}",
            ]
        )
    print(f"\ndense: {1e3 * spread(t.wall['dense']).median:.1f} ms; padded bound's own FLOPs-ideal {ideal_bound:.2f}x")
    header = ["variant", "batch", "ms", "speed-up (IQR)", "CPU-time speed-up", "FLOPs-ideal", "achieved / ideal"]
    print(markdown_table(header, rows, "lrrrrrr"))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
