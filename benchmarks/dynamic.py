"""Per-input dynamic inference in a timm ViT on CPU: measured speed-up over dense against the FLOPs-ideal one.

Run from the repository root (about 10 minutes with the defaults, on one thread)::

    python benchmarks/dynamic.py
    python benchmarks/dynamic.py --cases b3 --batches 1 --rounds 20

Cases (``vit_small_patch16_224``, ``pretrained=False``, seed 0, 224x224, fp32, eval mode, random weights):

* ``b3``: the ``cls_attention`` gate (EViT's score, no parameters) at block 3, keep 0.5: blocks 3 (its MLP) to
  11 run on 98 of the 196 patch tokens (+ the class token).
* ``dynamicvit``: DynamicViT's layout: ``predictor`` gates (a learned MLP per location, its cost included) at
  blocks 3, 6, 9 with keep 0.7 each (0.7, 0.49, 0.343 of the tokens).
* ``evit``: ``cls_attention`` at blocks 3, 6, 9, keep 0.7, dropped tokens fused into one (EViT).
* ``threshold``: LTP's ``threshold`` gate at block 3, calibrated (`calibrate_tokens_`, 16 other images) to keep
  0.5 of the tokens on average: each image keeps its own number of tokens; a batch is packed.
* ``ltp``: ``threshold`` gates at blocks 3, 6, 9, calibrated to keep 0.7 per location (0.7, 0.49, 0.34 on
  average, as ``evit``), counts per image differ at every gate.
* ``depth``: a ``router`` on every block (per-input layer skipping), its weights drawn at random (seed 0, so
  that about half of the (image, block) pairs run; an untrained router runs everything): at batch 1 a skipped
  block costs only its router, in a batch the images that run a block are gathered along the batch dimension.
* ``tokens_depth``: token gates and routers in one model: ``cls_attention`` at block 3, keep 0.5, and a
  ``router`` on each of the 8 blocks after it (4-11), random weights (seed 0) and biases set so that each router
  skips a quarter of 64 calibration images (``ROUTER_SKIP``; the fraction of (image, block) pairs that really
  run on the timed batch is printed; the batch-1 image is the first one that skips 2 of the 8 routed blocks):
  the routed blocks see 99 tokens per image, the images of a batch that run a block are gathered along the batch
  dimension.
* ``threshold_depth``: the same routers after a ``threshold`` gate at block 3 calibrated to keep 0.5 of the
  tokens: each image keeps its own number of tokens, a routed block runs on the packed segments of the images it
  runs for.

Every input of a batch chooses its own tokens (or blocks) (random images, so the decisions differ across the batch); the
batch stays one tensor because each input keeps the same number of tokens, except for the threshold cases, whose
images are Gaussian noise times a per-image contrast in [0, 2) (so that their token counts differ widely) and
whose batches are packed (`dynsparse.layers.token_pack`). Method: ``torch.inference_mode()``,
a fixed random batch, warm-up rounds, then rounds that run dense and dynamic once each in alternating order;
the speed-up is the median of the per-round paired ratios (quartiles in brackets), by wall clock and by process
CPU time. The FLOPs-ideal speed-up is the ratio of ``torch.utils.flop_counter`` counts of one forward pass of
each model (the dynamic one counted with its gates and as it ran: fewer tokens after the gates).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from dynsparse.commands.args import nonnegative_int, positive_int

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import count_flops, interleaved_rounds, markdown_table, speed_cells

CASES = {
    "b3": {"gate": "cls_attention", "blocks": [3], "keep": 0.5},
    "dynamicvit": {"gate": "predictor", "blocks": [3, 6, 9], "keep": 0.7},
    "evit": {"gate": "cls_attention", "blocks": [3, 6, 9], "keep": 0.7, "fuse": True},
    "threshold": {"gate": "threshold", "blocks": [3], "keep": 0.5},
    "ltp": {"gate": "threshold", "blocks": [3, 6, 9], "keep": 0.7},
    "depth": {"gate": "router", "blocks": "all", "keep": 0.5},
    "tokens_depth": {"gate": "cls_attention", "blocks": [3], "keep": 0.5},
    "threshold_depth": {"gate": "threshold", "blocks": [3], "keep": 0.5},
}
#: Routers of the ``*_depth`` cases: the blocks after the token gate.
ROUTED = {"gate": "router", "blocks": list(range(4, 12)), "keep": 0.5}
#: Fraction of the calibration images each router of the ``*_depth`` cases skips.
ROUTER_SKIP = 0.25


def images(case: str, n: int, seed: int) -> torch.Tensor:
    """The timed batch: Gaussian noise (times a per-image contrast in [0, 2) for the threshold cases)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 224, 224, generator=g)
    return x * (2 * torch.rand(n, 1, 1, 1, generator=g)) if CASES[case]["gate"] == "threshold" else x


def build(case: str):
    import timm

    import dynsparse as ds

    torch.manual_seed(0)
    dense = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    torch.manual_seed(0)
    dyn = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    dyn.load_state_dict(dense.state_dict())
    if case.endswith("_depth"):
        spec = dict(CASES[case])
        keep = spec.pop("keep") if spec["gate"] == "threshold" else None
        ds.sparsify_(dyn, {"tokens": spec, "depth": ROUTED})
        if keep is not None:
            from dynsparse.gates.tokens import TokenGate
            from dynsparse.layers.tokens import calibrate_tokens_

            ds.set_budget_(dyn, keep, kind=TokenGate)
            with torch.inference_mode():
                calibrate_tokens_(dyn, [images(case, 16, 1000)])
        _fix_routers(dyn, images(case, 64, 2000))
    elif case == "depth":
        ds.sparsify_(dyn, {"depth": CASES[case]})
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for b in dyn.blocks:
                b.router.proj.weight.copy_(torch.randn(b.router.proj.weight.shape, generator=g) * 0.5)
                b.router.proj.bias.zero_()
    elif CASES[case]["gate"] == "threshold":
        from dynsparse.layers.tokens import calibrate_tokens_

        spec = dict(CASES[case])
        keep = spec.pop("keep")
        ds.set_budget_(ds.sparsify_(dyn, {"tokens": spec}), keep)
        with torch.inference_mode():
            calibrate_tokens_(dyn, [images(case, 16, 1000)])
    else:
        ds.sparsify_(dyn, {"tokens": CASES[case]})
    return dense, dyn.eval()


def _fix_routers(model, x: torch.Tensor) -> None:
    """Random router weights (seed 0), each bias set so that the router skips ``ROUTER_SKIP`` of the images ``x``.

    One pass over ``x``: each router, when it is reached, sets its bias from the logits of the images that reach
    it (the earlier routers already decide with their final biases) and decides with it.
    """
    from dynsparse.layers.routing import RoutedBlock

    routers = [b.router for b in model.blocks if isinstance(b, RoutedBlock)]
    g = torch.Generator().manual_seed(0)

    def calibrate(proj, args, out):
        raw = out - proj.bias
        proj.bias.fill_(-float(torch.quantile(raw.flatten(), ROUTER_SKIP)))  # runs iff logit >= 0 (keep 0.5)
        return raw + proj.bias

    with torch.no_grad():
        for r in routers:
            r.proj.weight.copy_(torch.randn(r.proj.weight.shape, generator=g) * 0.5)
    hooks = [r.proj.register_forward_hook(calibrate) for r in routers]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()


def run_fraction(model, x: torch.Tensor) -> float | None:
    """Fraction of (image, routed block) pairs that run on ``x`` (None without routers)."""
    from dynsparse.layers.routing import RoutedBlock

    routers = [b.router for b in model.blocks if isinstance(b, RoutedBlock)]
    if not routers:
        return None
    runs = []
    hooks = [r.proj.register_forward_hook(lambda m, a, out: runs.append(out.flatten() >= 0)) for r in routers]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    return float(torch.cat(runs).float().mean())


def timed_images(case: str, n: int, model) -> torch.Tensor:
    """The timed batch; at batch 1 of a ``*_depth`` case, the first image (seed 1, 2, ...) whose routers skip
    ``ROUTER_SKIP`` of the routed blocks, as the batch does on average (one random image skips anywhere from none to
    most of them)."""
    if n != 1 or not case.endswith("_depth"):
        return images(case, n, n)
    for seed in range(1, 100):
        x = images(case, 1, seed)
        if abs(run_fraction(model, x) - (1 - ROUTER_SKIP)) < 1e-6:
            return x
    raise RuntimeError(f"{case}: no image among 99 runs {1 - ROUTER_SKIP:.0%} of the routed blocks")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--batches", type=positive_int, nargs="+", default=[1, 32])
    p.add_argument(
        "--rounds", type=nonnegative_int, default=0, help="timed rounds (default: 30 at batch 1, 8 at batch 32)"
    )
    p.add_argument("--warmup", type=nonnegative_int, default=2)
    p.add_argument("--threads", type=positive_int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
        f"vit_small_patch16_224 224x224 fp32, inference_mode"
    )
    rows = []
    t_start = time.perf_counter()
    for case in args.cases:
        dense, dyn = build(case)
        for b in args.batches:
            x = timed_images(case, b, dyn)
            ran = run_fraction(dyn, x) if case.endswith("_depth") else None
            if ran is not None:
                print(f"# {case}, batch {b}: the routed blocks run for {ran:.0%} of the (image, block) pairs")
            with torch.inference_mode():
                ideal = count_flops(dense, x) / count_flops(dyn, x)
                rounds = args.rounds or (30 if b == 1 else 8)
                t = interleaved_rounds(
                    {"dense": lambda m=dense, x=x: m(x), "dyn": lambda m=dyn, x=x: m(x)}, rounds, args.warmup
                )
            rows.append([case, b, *speed_cells(t, ideal), rounds])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    print()
    print(
        markdown_table(
            [
                "case",
                "batch",
                "dense ms",
                "dynamic ms",
                "speed-up, wall (IQR)",
                "speed-up, CPU time",
                "FLOPs-ideal",
                "achieved / ideal",
                "rounds",
            ],
            rows,
            "lrrrrrrrr",
        )
    )
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
