"""The ``dynsparse`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import timm
    import torch
    import torch.nn.functional as F

    import dynsparse as ds

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=4, num_classes=10
    )
    spec = {d: {"gate": "hard_concrete"} for d in ("neurons", "heads", "layers")}
    ds.sparsify_(model, spec)
    print(f"model: vit_tiny (depth 4, 32x32 input), gates: {len(list(ds.named_gates(model)))} on {', '.join(spec)}")
    gate_params = [p for n, p in model.named_parameters() if ".gate." in n]
    weights = [p for n, p in model.named_parameters() if ".gate." not in n]
    opt = torch.optim.AdamW([{"params": weights, "lr": 1e-3}, {"params": gate_params, "lr": 0.1}])
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    n_units = sum(g.num_units for _, g in ds.named_gates(model))
    model.train()
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss_task = F.cross_entropy(model(x), y)
        loss = loss_task + args.lam * ds.penalty(model) / n_units
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for _, g in ds.named_gates(model):
            if isinstance(g, ds.HardConcreteGate):
                g.constrain_()
        if step % max(1, args.steps // 5) == 0 or step == args.steps:
            print(
                f"step {step:4d}  task loss {loss_task.item():.4f}  expected L0 "
                f"{ds.penalty(model).item():8.1f} / {n_units}"
            )
    print(f"trained {args.steps} steps on random data in {time.perf_counter() - t0:.1f}s")
    model.eval()
    print(ds.sparsity_report(model, torch.zeros(1, 3, 32, 32)))
    return 0


def _convert(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    import dynsparse as ds
    from dynsparse.report import _default_input

    model, info = ds.load_gated(args.checkpoint)
    model.eval()
    x = _default_input(model)
    if x is None:
        raise ds.ConfigError(f"{args.checkpoint}: the model has no input_size in its pretrained_cfg to verify with")
    x = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x.dtype)
    converted = ds.convert(model)
    diff = ds.verify(model, converted, x, atol=args.atol, rtol=args.atol)
    out = Path(args.out)
    path = ds.save(converted, out / "model.safetensors", arch=info["arch"])
    (out / "plan.json").write_text(json.dumps(converted.slice_plan.to_dict(), indent=1, sort_keys=True) + "\n")
    n0 = sum(p.numel() for n, p in model.named_parameters() if ".gate." not in n)
    n1 = sum(p.numel() for p in converted.parameters())
    report = ds.sparsity_report(model, x)
    print(f"converted {args.checkpoint} -> {path}")
    print(f"parameters: {n0:,} -> {n1:,} ({100 * n1 / max(n0, 1):.1f}%)")
    print(f"FLOPs kept (estimate from the gates): {100 * report.flops_keep_ratio:.1f}%")
    print(f"max-abs difference to the gated model on a random image: {diff:.3g}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dynsparse`` command."""
    parser = argparse.ArgumentParser(prog="dynsparse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="gate a small timm ViT, train it a few steps, print a sparsity report")
    demo.add_argument("--steps", type=int, default=60)
    demo.add_argument("--batch", type=int, default=32)
    demo.add_argument("--lam", type=float, default=2.0, help="weight of the expected-L0 penalty (per unit)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--threads", type=int, default=1)
    demo.set_defaults(func=_demo)
    conv = sub.add_parser("convert", help="convert a gated checkpoint (save_gated) into a smaller static model")
    conv.add_argument("checkpoint", help="gated checkpoint written by dynsparse.save_gated (.safetensors)")
    conv.add_argument("--out", required=True, help="output directory (model.safetensors + plan.json)")
    conv.add_argument("--atol", type=float, default=1e-4, help="tolerance of the built-in output check")
    conv.set_defaults(func=_convert)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from dynsparse.errors import DynsparseError

    try:
        return args.func(args)
    except DynsparseError as e:
        print(f"dynsparse {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
