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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
