"""The stage field ``calibrate``: validation, a calibrated run resumes exactly, conversion keeps the calibration."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import yaml

TINY = """\
name: tiny-calib
seed: 2
model:
  name: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, num_classes: 10, embed_dim: 32, depth: 2, num_heads: 2}
data: {dataset: digits, batch_size: 32, train_subset: 320}
stages:
  - {name: dense, epochs: 1, optimizer: {name: adamw, lr: 0.003}}
  - name: sparse
    epochs: 2
    sparsify: SPEC
    calibrate: CAL
    regularizers: [{name: dynamic}]
NEXT
convert: {static: false}
evaluate: {latency: false}
"""
THRESHOLD_HARD = "  - {name: hard, epochs: 1, fix_gates: true, calibrate: {batches: 3, keep: 0.5}}\n"
CASES = {
    "cats": ("{neurons: {gate: cats, keep: 0.5}}", "{batches: 3, at: both}", ""),
    "dejavu": ("{neurons: {gate: dejavu, keep: 0.5, rank: 8}}", "{batches: 3, epochs: 3, lr: 0.01}", ""),
    "dejavu_heads": ("{heads: {gate: dejavu, keep: 0.5, rank: 8}}", "{batches: 3, epochs: 3, lr: 0.01}", ""),
    "threshold": (
        "{tokens: {gate: threshold, blocks: [1], target: 0.5, weight: 1.0}}",
        "{batches: 3, at: start, keep: 0.5, init_threshold: true}",
        THRESHOLD_HARD,
    ),
}


def _text(kind: str) -> str:
    spec, cal, nxt = CASES[kind]
    return TINY.replace("SPEC", spec).replace("CAL", cal).replace("NEXT\n", nxt)


def _recipe(kind: str):
    from dynsparse.recipes import parse_recipe

    return parse_recipe(yaml.safe_load(_text(kind)))


def _calibration(model) -> dict[str, torch.Tensor]:
    """The state-dict entries a calibration writes (cats quantiles / thresholds, predictors, token tables / θ)."""
    keys = (
        "neurons.quantiles",
        "neurons.threshold",
        "neurons.predictor",
        "attn.heads.predictor",
        "tokens.gate.table",
        "tokens.gate.threshold",
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items() if any(s in k for s in keys)}


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("kind", sorted(CASES))
def test_calibrate_field_parses(kind):
    r = _recipe(kind)
    assert r.stages[1].calibrate["batches"] == 3


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        (
            "{batches: 3, at: both}",
            "{batchs: 3}",
            r"unknown field 'stages\[1\]\.calibrate\.batchs' \(line 12\)\..*batches",
        ),
        ("{batches: 3, at: both}", "{lr: 0.1}", r"'stages\[1\]\.calibrate\.lr'.*Options for cats: batches, at"),
        ("{batches: 3, at: both}", "{batches: 0}", r"stages\[1\]\.calibrate\.batches \(line 12\): .*>= 1, got 0"),
        ("{batches: 3, at: both}", "{at: middle}", r"stages\[1\]\.calibrate\.at \(line 12\): 'middle' is not one of"),
        (
            "calibrate: {batches: 3, at: both}",
            "calibrate: 3",
            r"stages\[1\]\.calibrate \(line 12\): expected a mapping",
        ),
        ("{neurons: {gate: cats, keep: 0.5}}", "{neurons: {gate: hard_concrete}}", r"calibrate \(line 12\): nothing"),
    ],
)
def test_bad_calibrate_names_field_and_line(tmp_path, old, new, match):
    from dynsparse.recipes import load_recipe
    from dynsparse.recipes.schema import RecipeError

    p = tmp_path / "r.yaml"
    p.write_text(_text("cats").replace(old, new))
    with pytest.raises(RecipeError, match=match):
        load_recipe(p)


@pytest.mark.parametrize(
    ("kind", "cal", "match"),
    [
        ("dejavu", "{epochs: 1.5}", r"calibrate\.epochs.*expected an integer"),
        ("dejavu", "{lr: fast}", r"calibrate\.lr.*expected a number"),
        ("dejavu", "{label: top}", r"calibrate\.label.*not one of"),
        ("dejavu", "{keep: 0.5}", r"unknown field 'stages\[1\]\.calibrate\.keep'"),
        ("dejavu_heads", "{label: topk}", r"calibrate\.label.*not one of \['norm', 'contribution'\]"),
        ("dejavu_heads", "{epochs: 1.5}", r"calibrate\.epochs.*expected an integer"),
        ("dejavu_heads", "{max_rows: 0}", r"calibrate\.max_rows.*an integer >= 1, got 0"),
        ("dejavu_heads", "{batch_size: -1}", r"calibrate\.batch_size.*an integer >= 1, got -1"),
        ("dejavu_heads", "{holdout: 1.0}", r"calibrate\.holdout.*a fraction in \[0, 1\)"),
        ("threshold", "{keep: 1.5}", r"calibrate\.keep.*fraction in \(0, 1\]"),
        ("threshold", "{init_threshold: true}", r"calibrate\.init_threshold.*needs keep"),
        ("threshold", "{keep: 0.5, init_threshold: true}", r"calibrate\.init_threshold.*at: start"),
        ("threshold", "{keep: 0.5, init_threshold: 1}", r"calibrate\.init_threshold.*true or false"),
        # keep 1's calibrated threshold is -inf: θ would start there with a zero gradient and never learn
        ("threshold", "{keep: 1, at: start, init_threshold: true}", r"calibrate\.init_threshold.*keep below 1"),
    ],
)
def test_bad_calibrate_options(kind, cal, match):
    from dynsparse.recipes import parse_recipe
    from dynsparse.recipes.schema import RecipeError

    text = _text(kind).replace(CASES[kind][1], cal)
    with pytest.raises(RecipeError, match=match):
        parse_recipe(yaml.safe_load(text))


def test_calibrate_needs_the_gate_of_an_earlier_or_the_same_stage():
    """Gates persist: a later stage may (re-)calibrate the gates an earlier stage installed."""
    from dynsparse.recipes import parse_recipe
    from dynsparse.recipes.schema import RecipeError

    data = yaml.safe_load(_text("cats"))
    assert parse_recipe(data).stages[1].calibrate["at"] == "both"
    data["stages"].append({"name": "again", "epochs": 0, "calibrate": {"batches": 2}})
    assert parse_recipe(data).stages[2].calibrate == {"batches": 2}
    data["stages"][0]["calibrate"] = {"batches": 2}
    with pytest.raises(RecipeError, match=r"stages\[0\]\.calibrate: nothing to calibrate"):
        parse_recipe(data)


def test_predictor_options_follow_train_predictors():
    from dynsparse.layers.head_gating import train_head_predictors_
    from dynsparse.layers.neuron_gating import train_predictors_
    from dynsparse.recipes.calibrate import HEAD_PREDICTOR_OPTIONS, PREDICTOR_OPTIONS

    for fit, options in ((train_predictors_, PREDICTOR_OPTIONS), (train_head_predictors_, HEAD_PREDICTOR_OPTIONS)):
        sig = inspect.signature(fit)
        kw = [n for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY and n != "max_batches"]
        assert list(options) == kw, fit.__name__


def test_neuron_and_head_predictors_calibrate_together():
    from dynsparse.recipes import parse_recipe
    from dynsparse.recipes.calibrate import model_kinds
    from dynsparse.recipes.schema import RecipeError

    spec = "{neurons: {gate: dejavu, keep: 0.5}, heads: {gate: dejavu, keep: 0.5}}"
    text = TINY.replace("SPEC", spec).replace("CAL", "{batches: 2, epochs: 2}").replace("NEXT\n", "")
    assert parse_recipe(yaml.safe_load(text)).stages[1].calibrate == {"batches": 2, "epochs": 2}
    with pytest.raises(RecipeError, match=r"calibrate\.label.*neuron and head predictors"):
        parse_recipe(yaml.safe_load(text.replace("{batches: 2, epochs: 2}", "{batches: 2, label: topk}")))
    import timm

    import dynsparse as ds

    m = timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=2, embed_dim=32, depth=1, num_heads=2)
    assert model_kinds(ds.sparsify_(m, {"heads": {"gate": "dejavu"}})) == ["dejavu_heads"]


# ---------------------------------------------------------------------------------------- run, resume, save
class _Crash(Exception):
    pass


def _run_crashed(recipe, out, monkeypatch, after: int):
    """Run ``recipe`` until its ``after``-th checkpoint is written, crash, then resume; returns the model."""
    from dynsparse.recipes.train import Trainer

    original = Trainer._save
    saves = []

    def crash(self, *args):
        original(self, *args)
        saves.append(1)
        if len(saves) == after:
            raise _Crash

    monkeypatch.setattr(Trainer, "_save", crash)
    with pytest.raises(_Crash):
        Trainer(recipe, out, progress=False).run()
    monkeypatch.setattr(Trainer, "_save", original)
    return Trainer(recipe, out, resume=True, progress=False).run()


@pytest.mark.parametrize("kind", sorted(CASES))
def test_calibrated_run_resumes_exactly_and_converts(kind, tmp_path, monkeypatch):
    import dynsparse as ds
    from dynsparse.convert import convert, load, save
    from dynsparse.recipes.train import Trainer, state_digest

    torch.set_num_threads(1)
    recipe = _recipe(kind)
    straight = Trainer(recipe, tmp_path / "a", progress=False).run()
    calib = _calibration(straight)
    assert calib
    for k, v in calib.items():  # calibrated: finite and not a constant
        assert torch.isfinite(v).all(), k
        if v.numel() > 1:
            assert v.std() > 0, k
    if kind == "threshold":  # the soft stage started at the calibrated threshold and the hard stage kept θ fixed
        g = straight.blocks[1].tokens.gate
        assert g.keep == 0.5 and not g.threshold.requires_grad and g.temperature == 1e-3
    budgets = ds.get_budget(straight)
    records = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    key = {"cats": "cats_threshold", "dejavu": "dejavu_recall", "dejavu_heads": "head_recall"}.get(
        kind, "token_threshold"
    )
    assert key in records[1]  # the first record of the calibrated stage carries its numbers
    # crashed right after the dense stage (the calibration runs again on resume) and inside the calibrated stage
    for after in (1, 2):
        resumed = _run_crashed(recipe, tmp_path / f"b{after}", monkeypatch, after)
        assert state_digest(resumed) == state_digest(straight), after
        assert ds.get_budget(resumed) == budgets
        for k, v in _calibration(resumed).items():
            assert torch.equal(v, calib[k]), k
    # a finished run resumes to the same model
    again = Trainer(recipe, tmp_path / "a", resume=True, progress=False).run()
    assert state_digest(again) == state_digest(straight) and ds.get_budget(again) == budgets
    # convert(static=False) + save / load keep the calibration and the decisions
    model = straight.cpu().eval()
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    conv = convert(model, verify_inputs=x, static=False)
    save(
        conv,
        tmp_path / "m.safetensors",
        arch={"library": "timm", "name": recipe.model.name, "kwargs": recipe.model.kwargs},
    )
    back = load(tmp_path / "m.safetensors")
    for k, v in _calibration(back).items():
        assert torch.equal(v, calib[k]), k
    assert set(_calibration(back)) == set(calib)
    assert ds.get_budget(back) == budgets
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=1e-5)


def test_calibrate_only_stage(tmp_path):
    """``epochs: 0``: sparsify + calibrate, one log record (epoch 0) and a checkpoint; resuming changes nothing."""
    from dynsparse.recipes import parse_recipe
    from dynsparse.recipes.train import Trainer, state_digest

    data = yaml.safe_load(_text("cats"))
    data["stages"][1]["epochs"] = 0
    recipe = parse_recipe(data)
    model = Trainer(recipe, tmp_path, progress=False).run()
    records = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in records] == [("dense", 1), ("sparse", 0)]
    assert records[1]["train_loss"] is None and "cats_threshold" in records[1]
    assert model.blocks[0].mlp.neurons.calibrated
    again = Trainer(recipe, tmp_path, resume=True, progress=False).run()
    assert state_digest(again) == state_digest(model)
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 2
