"""The ``dynsparse`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from dynsparse.commands.args import nonnegative_float, path_arg, positive_int

__all__ = ["main"]

DEVICE_HELP = "train on auto, cpu, cuda or cuda:N (overrides the recipe's device; the report's latency is CPU)"


def _train(args: argparse.Namespace) -> int:
    from dynsparse.recipes.tasks import load_task_recipe, run_task_recipe

    recipe = load_task_recipe(args.recipe, _overrides(args))  # the recipe's ``task`` picks schema and runner
    torch_threads(args.threads)
    run_task_recipe(recipe, args.out, resume=args.resume, progress=not args.no_progress)
    return 0


def _overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides, then ``--device`` as the override of the recipe's ``device`` field."""
    return [*(args.set or []), *([f"device={args.device}"] if args.device else [])]


def _demo(args: argparse.Namespace) -> int:
    from importlib.resources import files

    from dynsparse.recipes import load_recipe
    from dynsparse.recipes.run import run_recipe

    path = files("dynsparse.recipes").joinpath("demo.yaml")
    recipe = load_recipe(str(path), _overrides(args))
    torch_threads(args.threads)
    print(f"dynsparse demo: recipe {path} (output in {args.out or recipe.output_dir})")
    run_recipe(recipe, args.out, resume=args.resume, progress=not args.no_progress)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    import dynsparse as ds
    from dynsparse.commands.modelfile import load_model_file, model_dtype
    from dynsparse.convert.io import read_info
    from dynsparse.data import load_dataset, make_loader

    stored = read_info(args.model).get("data") or {}
    dataset, image_size, channels = _eval_data(args, stored)
    hint = (
        f"the file stores input {'x'.join(map(str, stored['input_shape']))}: leave out --image-size / --channels"
        if stored.get("input_shape")
        else "pass --image-size and --channels as in the data field of the recipe that trained it"
    )
    model = load_model_file(args.model).model  # a converted model, or a gated checkpoint (its eval outputs)
    dtype = model_dtype(model)  # the images are float32; a bfloat16 file takes them cast
    test = load_dataset(dataset, split="test", root=args.root, image_size=image_size, channels=channels)
    correct = total = 0
    with torch.no_grad():
        for x, y in make_loader(test, 256, shuffle=False, seed=0):
            try:
                logits = model(x.to(dtype))
            except (RuntimeError, AssertionError, ValueError) as e:  # images of another size or channel count
                if total:
                    raise
                shape = "x".join(map(str, x.shape[1:]))
                raise ds.ConfigError(
                    f"{args.model}: the {dataset} test images ({shape}) do not run through the model ({e}); {hint}"
                ) from e
            correct += int((logits.argmax(-1) == y).sum())
            total += len(y)
    print(f"{args.model}: test accuracy {100 * correct / total:.2f}% on {total} {dataset} images")
    return 0


def _eval_data(args: argparse.Namespace, stored: dict) -> tuple[str, int | list[int] | None, int | None]:
    """``(dataset, image_size, channels)`` for ``eval``: the flags where given, else what the model file stores.

    A flag that contradicts the stored value wins, with a warning on stderr: the file records what the model was
    trained on, and evaluating elsewhere (a CNN at another resolution, another data set) is allowed on purpose.
    """
    from dynsparse.errors import ConfigError

    if "distill" in stored or "tokenizer" in stored:  # a text encoder (convert.metadata.TEXT_DATA_FIELDS)
        raise ConfigError(
            f"{args.model}: a text encoder (tokenizer {stored.get('tokenizer', '?')}): `dynsparse eval` tests image "
            "classifiers; the sentence-embedding run's report.json has its held-out cosine and probe accuracy"
        )
    dataset = args.dataset or stored.get("dataset")
    if dataset is None:
        raise ConfigError(f"{args.model}: no data set stored in the file; pass --dataset")
    if dataset == "image-folder" and args.root is None:  # the file does not store the directory
        raise ConfigError(f"{args.model}: data set image-folder: pass --root DIR, the directory of its class folders")
    shape = stored.get("input_shape")
    if stored.get("dataset") and dataset != stored["dataset"]:
        _warn(args, f"the model was trained on {stored['dataset']}; evaluating on --dataset {dataset}")
    # the stored input shape, not the recipe's image_size / channels, which may be null (the native size)
    image_size = args.image_size if args.image_size is not None else (shape[1:] if shape else None)
    channels = args.channels if args.channels is not None else (shape[0] if shape else None)
    if shape and args.image_size is not None and [args.image_size] * 2 != list(shape[1:]):
        _warn(args, f"the model was trained on {shape[1]}x{shape[2]} images; evaluating at --image-size {image_size}")
    if shape and args.channels is not None and args.channels != shape[0]:
        _warn(args, f"the model was trained on {shape[0]}-channel images; evaluating with --channels {channels}")
    return dataset, image_size, channels


def _warn(args: argparse.Namespace, text: str) -> None:
    print(f"dynsparse {args.command}: warning: {args.model}: {text} (stored in the file)", file=sys.stderr)


def torch_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _convert(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    import dynsparse as ds
    from dynsparse.atomic import atomic_write
    from dynsparse.commands.modelfile import check_not_input, is_dynamic
    from dynsparse.flops import default_input as _default_input
    from dynsparse.report import count_params

    out = Path(args.out)
    check_not_input("--out", args.out, [out / "model.safetensors", out / "plan.json"], [args.checkpoint])
    model, info = ds.load_gated(args.checkpoint)
    model.eval()
    x = _default_input(model)
    data = info.get("data")
    if data and data.get("input_shape"):  # the input the model was trained on, recorded by `dynsparse train`
        x = torch.zeros(1, *data["input_shape"], dtype=x.dtype if x is not None else torch.float32)
    if x is None:
        raise ds.ConfigError(
            f"{args.checkpoint}: no input shape to verify with (none stored in the file, no input_size in the "
            "model's pretrained_cfg)"
        )
    x = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x.dtype)
    dynamic = is_dynamic(model)  # input-dependent gates stay run-time skip modules, as a recipe's convert.static: false
    converted = ds.convert(model, static=not dynamic)
    tol = args.atol
    if tol is None:  # float32: 1e-4; a half-precision model rounds every layer's output to its own precision
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        tol = max(1e-4, 4 * torch.finfo(dtype).eps)
    diff = ds.verify(model, converted, x, atol=tol, rtol=tol)
    path = ds.save(converted, out / "model.safetensors", arch=info["arch"], data=data)
    plan = json.dumps(converted.slice_plan.to_dict(), indent=1, sort_keys=True) + "\n"
    atomic_write(out / "plan.json", lambda tmp: Path(tmp).write_text(plan))
    n0, n1 = count_params(model)[0], count_params(converted)[0]
    report = ds.sparsity_report(model, x)
    print(f"converted {args.checkpoint} -> {path}")
    print(f"parameters: {n0:,} -> {n1:,} ({100 * n1 / max(n0, 1):.1f}%)")
    print(f"FLOPs kept (estimate from the gates): {100 * report.flops_keep_ratio:.1f}%")
    print(f"max-abs difference to the gated model on a random image: {diff:.3g}")
    if dynamic:
        print("input-dependent gates kept as run-time modules: the model decides per input")
    return 0


def _sensitivity(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dynsparse.errors import ConfigError
    from dynsparse.recipes.analyse import run_sensitivity
    from dynsparse.recipes.tasks import load_task_recipe
    from dynsparse.recipes.text_schema import TextRecipe

    dimensions = _sensitivity_dimensions(args.dimensions)
    recipe = load_task_recipe(args.recipe, _overrides(args))  # ``task: image-classification`` may be written out
    if isinstance(recipe, TextRecipe):
        raise ConfigError(
            f"{args.recipe}: task: {recipe.task}: sensitivity analyses image-classification recipes only "
            "(prune one layer at a time and evaluate the test accuracy)"
        )
    torch_threads(args.threads)
    out = Path(args.out or Path(recipe.output_dir).expanduser() / "sensitivity")
    rep = run_sensitivity(
        recipe,
        out,
        from_run=args.from_run,
        group=args.group,
        dimensions=dimensions,
        ratios=args.ratios,
        layers=args.layers,
        eval_samples=args.eval_samples,
        max_drop=args.max_drop,
        progress=not args.no_progress,
    )
    print(f"sensitivity of the {rep['model']}, test accuracy on {rep['eval_samples']} images, no retraining:")
    print(rep["table"])
    if "ratios_for" in rep:
        print(f"largest ratio per layer losing at most {rep['max_drop']} points:")
        for name, r in rep["ratios_for"].items():
            print(f"  {name}: {r:.0%}")
    print(f"wrote {out / 'sensitivity.md'}, {out / 'sensitivity.json'}, {rep['plot']}")
    return 0


def _sensitivity_dimensions(text: str) -> list[str]:
    """The ``--dimensions`` list, checked before any training (an unknown name failed after the dense stage)."""
    from dynsparse.errors import ConfigError
    from dynsparse.registry import suggest
    from dynsparse.sparsify import DIMENSIONS

    dims = text.split(",")
    for d in dims:
        if d not in DIMENSIONS:
            raise ConfigError(
                f"--dimensions {text}: unknown dimension {d!r}.{suggest(d, DIMENSIONS)} Known: {', '.join(DIMENSIONS)}"
            )
    return dims


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dynsparse`` command."""
    parser = argparse.ArgumentParser(
        prog="dynsparse",
        description="Train, sparsify, convert, benchmark and analyse models (COMMAND --help: its options).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the built-in default recipe end to end (digits, small ViT)")
    train = sub.add_parser("train", help="run a recipe (YAML) end to end")
    train.add_argument("recipe", type=path_arg, help="path to a recipe YAML file")
    for p in (demo, train):
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe field")
        p.add_argument("--resume", action="store_true", help="continue from the output dir's checkpoint")
        p.add_argument("--out", default=None, help="output directory (default: the recipe's output_dir)")
        p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument("--device", default=None, help=DEVICE_HELP)
    demo.set_defaults(func=_demo)
    train.set_defaults(func=_train)
    ev = sub.add_parser("eval", help="test accuracy of a model file on a built-in data set")
    ev.add_argument(
        "model", type=path_arg, help="a converted model (model.safetensors) or a gated checkpoint (gated.safetensors)"
    )
    ev.add_argument(
        "--dataset",
        default=None,
        help="digits, mnist, fashion-mnist or image-folder (its test split); default: the one stored in the file",
    )
    ev.add_argument("--root", default=None, help="data directory (required for image-folder)")
    ev.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="resize the images, as the recipe's data.image_size (default: the size stored in the file)",
    )
    ev.add_argument(
        "--channels",
        type=int,
        choices=[1, 3],
        default=None,
        help="3 repeats grey images to RGB, as data.channels (default: the count stored in the file)",
    )
    ev.set_defaults(func=_eval)
    conv = sub.add_parser("convert", help="convert a gated checkpoint (save_gated) into a smaller static model")
    conv.add_argument(
        "checkpoint", type=path_arg, help="gated checkpoint written by dynsparse.save_gated (.safetensors)"
    )
    conv.add_argument("--out", type=path_arg, required=True, help="output directory (model.safetensors + plan.json)")
    conv.add_argument(
        "--atol",
        type=nonnegative_float,
        default=None,
        help="absolute and relative tolerance of the built-in output check (default: 1e-4, or 4 x the machine "
        "epsilon of a half-precision model: 0.031 for bfloat16, 0.0039 for float16)",
    )
    conv.set_defaults(func=_convert)
    sens = sub.add_parser("sensitivity", help="prune one layer at a time at increasing ratios; table and plot")
    sens.add_argument("recipe", type=path_arg, help="path to a recipe YAML file")
    sens.add_argument("--out", type=path_arg, default=None, help="output directory (default: OUTPUT_DIR/sensitivity)")
    sens.add_argument(
        "--from-run", type=path_arg, default=None, help="analyse the final model of this finished run's output dir"
    )
    sens.add_argument("--group", choices=["element", "units"], default="element", help="weights or gated units")
    sens.add_argument("--dimensions", default="channels,heads,neurons", help="dimensions gated for --group units")
    sens.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
        help="fractions pruned, each in [0, 1) (default: 0 to 0.9 in steps of 0.1)",
    )
    sens.add_argument("--layers", nargs="+", default=None, help="only these weight / gate fqns")
    sens.add_argument("--eval-samples", type=int, default=None, help="evaluate on the first N test images")
    sens.add_argument("--max-drop", type=float, default=None, help="per-layer ratios losing <= this many points")
    sens.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe field")
    sens.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads")
    sens.add_argument(
        "--device", default=None, help="train and evaluate on auto, cpu, cuda or cuda:N (overrides the recipe's device)"
    )
    sens.add_argument("--no-progress", action="store_true", help="no progress bars")
    sens.set_defaults(func=_sensitivity)
    from dynsparse.commands import analyse, bench, prune

    bench.add_parser(sub)
    analyse.add_parser(sub)
    prune.add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.command in ("train", "demo", "sensitivity") else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from dynsparse.errors import DynsparseError

    try:
        return args.func(args)
    except DynsparseError as e:
        print(f"dynsparse {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an output directory that cannot be made, a path that is a file: one line naming the path
        if e.filename is None:
            raise
        # os.replace(tmp, path) of an atomic write names the temporary file first and the user's path second
        print(f"dynsparse {args.command}: error: {e.filename2 or e.filename}: {e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
