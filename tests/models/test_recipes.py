"""Every contrastive recipe, with each backbone, learns the planted rule; positives, options and logs."""

import json

import numpy as np
import pytest
import torch

from app.cli import main
from models.backbone import SeqRecModel
from models.checkpoint import load_checkpoint, load_model
from models.errors import IncompatibleError, RecmergeError
from models.evaluate import eval_data, evaluate, evaluate_data, popularity_scorer
from models.recipes import RECIPES, recipe_class, recipe_options
from models.recipes.duorec import SameTargetIndex
from models.train import TrainConfig, train
from tests.synthetic import make_planted_dataset

CONTRASTIVE = ["cl4srec", "duorec-unsup", "duorec-sup", "duorec", "ehrec-stat", "ehrec-learn"]
TINY = dict(hidden=32, layers=1, heads=1, inner=64, max_len=20, batch_size=32, dropout=0.1, lr=1e-2, patience=0,
            schedule="constant", warmup_steps=0)  # runs of a few dozen steps: no warmup, no decay
# bert4rec's cloze sees ~5x fewer labels per step than next-item training: it needs more epochs, and more
# masking than the defaults, to learn the rule in seconds. Cosine similarity at τ=0.2 keeps the contrastive
# term from dominating such a tiny model early on (dot at τ=1 slows it down there).
PER_BACKBONE = {
    "bert4rec": dict(epochs=12, options={"mask_prob": 0.4, "last_item_share": 0.5}),
    "sasrec": dict(epochs=3, options={}),
}
CL = {"similarity": "cos", "temperature": 0.2}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from threads, and on a shared 2-core machine threads spin against each other.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return make_planted_dataset(tmp_path_factory.mktemp("planted"), n_users=200, n_items=50)


@pytest.fixture(scope="module")
def popularity_ndcg(planted):
    return evaluate_data(popularity_scorer(planted.item_popularity()), eval_data(planted, "test"),
                         protocols=("full",))["full"]["ndcg@10"]


def options_for(recipe, backbone):
    extra = {"gate_temperature": 0.05} if recipe == "ehrec-learn" else {}  # cosines live in [-1, 1]
    return {**PER_BACKBONE[backbone]["options"], **CL, **extra}


@pytest.mark.parametrize("backbone", ["bert4rec", "sasrec"])
@pytest.mark.parametrize("recipe", CONTRASTIVE)
def test_recipe_learns_the_planted_rule(planted, popularity_ndcg, tmp_path, recipe, backbone):
    epochs = PER_BACKBONE[backbone]["epochs"]
    cfg = TrainConfig(recipe=recipe, backbone=backbone, epochs=epochs, options=options_for(recipe, backbone), **TINY)
    res = train(planted, cfg, tmp_path / "m.safetensors")
    model, meta = load_model(res.checkpoint)
    got = evaluate(model, planted, split="test", protocols=("full",))["full"]["ndcg@10"]
    floor, factor = (0.5, 2.5) if backbone == "bert4rec" else (0.8, 4.0)
    assert got > floor and got > factor * popularity_ndcg, (got, popularity_ndcg)

    # The checkpoint records the recipe and its options, and holds backbone tensors only (no g).
    assert meta.recipe["name"] == recipe and meta.recipe["similarity"] == "cos"
    assert meta.recipe["cl_weight"] == recipe_options(recipe).cl_weight and meta.backbone.kind == backbone
    tensors, _ = load_checkpoint(res.checkpoint)
    assert set(tensors) == set(SeqRecModel(meta.backbone).state_dict())

    # What the thesis plots is logged per epoch.
    epochs_log = json.loads(res.log_path.read_text())["epochs"]
    assert len(epochs_log) == epochs
    for row in epochs_log:
        assert isinstance(row["k_stat"], float) and -1 <= row["k_stat"] <= 1
        hist = row["similarity_histogram"]
        assert len(hist["edges"]) == len(hist["counts"]) + 1 and sum(hist["counts"]) > 0
        assert row["cl_loss"] > 0
        if recipe.startswith("ehrec"):
            assert 0 < row["negatives_kept"] < 1
        if recipe == "ehrec-learn":
            assert row["k_learn_std"] > 0 and abs(row["k_learn_mean"] - row["k_threshold"]) < 0.5
    # From the second epoch on, the threshold used is the previous epoch's k_stat.
    assert [r["k_threshold"] for r in epochs_log[1:]] == pytest.approx([r["k_stat"] for r in epochs_log[:-1]])


def test_same_target_positive_index():
    rng = np.random.default_rng(0)
    samples = [np.array([5, 1]), np.array([3, 2]), np.array([1, 1]), np.array([9, 4, 1]), np.array([7, 3])]
    index = SameTargetIndex(samples)  # targets: 1, 2, 1, 1, 3
    picks = np.stack([index.sample(np.arange(5), rng) for _ in range(300)])  # (300, 5)
    targets = np.array([s[-1] for s in samples])
    assert (targets[picks] == targets).all()  # always the same target
    assert (picks[:, 1] == 1).all() and (picks[:, 4] == 4).all()  # alone with its target: itself
    for i in (0, 2, 3):  # never itself when others share the target, and every other one gets drawn
        assert set(picks[:, i]) == {0, 2, 3} - {i}
    counts = np.bincount(picks[:, 0], minlength=5)
    assert abs(counts[2] - counts[3]) < 60  # roughly uniform among the others


def test_every_recipe_is_registered_and_unknown_names_list_them():
    assert set(CONTRASTIVE) | {"bert4rec"} == set(RECIPES)
    with pytest.raises(RecmergeError, match="unknown recipe 'simclr'; known recipes: bert4rec, cl4srec"):
        recipe_class("simclr")


def test_options_are_typed_and_foreign_options_are_errors():
    o = recipe_options("ehrec-learn", {"reg_weight": "0.5", "similarity": "cos"})
    assert o.reg_weight == 0.5 and o.quantile == 0.9 and o.g_detach is True
    assert recipe_options("cl4srec").crop_eta == 0.6 and recipe_options("cl4srec").mask_gamma == 0.3
    with pytest.raises(RecmergeError, match="reg_weight: not an option of this recipe"):
        recipe_options("cl4srec", {"reg_weight": 1.0})
    with pytest.raises(RecmergeError, match="crop_eta: not an option of this recipe"):
        recipe_options("duorec", {"crop_eta": 0.5})
    with pytest.raises(RecmergeError, match="similarity"):
        recipe_options("duorec", {"similarity": "l2"})
    with pytest.raises(RecmergeError, match="quantile"):
        recipe_options("ehrec-stat", {"quantile": 1.5})
    backbone_fields = set(recipe_class("bert4rec").Options.model_fields)
    for name in CONTRASTIVE:  # the CLI turns descriptions into --help text
        fields = recipe_class(name).Options.model_fields
        assert all(f.description for k, f in fields.items() if k not in backbone_fields), name


def test_cli_refuses_a_flag_of_another_recipe_without_a_traceback(planted, tmp_path, capsys):
    rc = main(["train", "--data", str(planted.path), "--recipe", "cl4srec", "--reg-weight", "1",
               "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "--reg-weight not an option of recipe 'cl4srec'" in err and "Traceback" not in err
    assert not (tmp_path / "x.safetensors").exists()


def test_init_from_another_backbone_size_or_dataset_is_refused_for_a_contrastive_recipe(planted, tmp_path):
    base = train(planted, TrainConfig(epochs=1, **TINY), tmp_path / "base.safetensors")
    init = str(base.checkpoint)
    with pytest.raises(IncompatibleError, match="kind: checkpoint bert4rec vs requested sasrec"):
        train(planted, TrainConfig(recipe="ehrec-learn", backbone="sasrec", epochs=1, init=init, **TINY),
              tmp_path / "tuned.safetensors")
    with pytest.raises(IncompatibleError, match="hidden: checkpoint 32 vs requested 64"):
        train(planted, TrainConfig(recipe="cl4srec", epochs=1, init=init, **{**TINY, "hidden": 64}),
              tmp_path / "tuned.safetensors")
    other = make_planted_dataset(tmp_path / "other", n_users=200, n_items=50, seed=1)
    with pytest.raises(IncompatibleError, match="--init .*trained on dataset fingerprint .*but the dataset has"):
        train(other, TrainConfig(recipe="duorec", epochs=1, init=init, **TINY), tmp_path / "tuned.safetensors")
    assert not (tmp_path / "tuned.safetensors").exists()
    # The same recipe from a matching base trains (fine-tune setting) and starts from the base's quality.
    tuned = train(planted, TrainConfig(recipe="ehrec-learn", epochs=1, init=str(base.checkpoint), **TINY),
                  tmp_path / "tuned.safetensors")
    assert json.loads(load_checkpoint(tuned.checkpoint)[1].extra["train"])["config"]["init"] == str(base.checkpoint)
