"""Mixed precision: bfloat16 products, float32 everything else; equal to float32 up to bfloat16 rounding."""

import pytest
import torch
import torch.nn.functional as F

from models.backbone import SeqRecModel
from models.checkpoint import load_model
from models.config import BackboneConfig
from models.errors import RecmergeError
from models.evaluate import evaluate
from models.item_ce import item_cross_entropy, sampled_cross_entropy
from models.precision import fast_bf16, mixed_precision, resolve_precision
from models.train import TrainConfig, train
from tests.models.test_train import SMALL
from tests.synthetic import make_planted_dataset

BF16 = torch.bfloat16


def _rounded(*ts):
    """The operands as a bfloat16 product sees them, widened again."""
    return [t.detach().to(BF16).double() for t in ts]


def _inputs(M, N, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(M, D, generator=g, requires_grad=True)
    table = (0.5 * torch.randn(N, D, generator=g)).requires_grad_()
    bias = torch.randn(N, generator=g, requires_grad=True)
    return z, table, bias, g


@pytest.mark.parametrize("chunk", [7, 64, 300, 1000])
def test_full_softmax_in_bf16_is_the_loss_of_rounded_operands(chunk):
    z, table, bias, g = _inputs(300, 70)
    labels = torch.randint(0, 70, (300,), generator=g)
    got = item_cross_entropy(z, table, bias, labels, chunk=chunk, mm_dtype=BF16)
    zr, tr = _rounded(z, table)
    want = F.cross_entropy((zr @ tr.T).to(BF16).double() + bias.detach().double(), labels)
    # The product leaves oneDNN in bfloat16 (as under autocast); from there on all is float32. So the loss
    # agrees closely with the reference, and a padded row or a misplaced chunk (an error of order one
    # logit) would show.
    assert abs(got.item() - want.item()) < 1e-5
    exact = F.cross_entropy(z @ table.T + bias, labels)
    g_got = torch.autograd.grad(got, (z, table, bias))
    g_want = torch.autograd.grad(exact, (z, table, bias))
    for a, b in zip(g_got, g_want):
        assert a.dtype == torch.float32
        # The backward products take the softmax gradient rounded to bfloat16: relative error ~2^-8.
        assert (a - b).norm() / b.norm() < 2e-2


@pytest.mark.parametrize("chunk", [5, 300])
def test_sampled_softmax_in_bf16_is_the_loss_of_rounded_operands(chunk):
    z, table, bias, g = _inputs(50, 9)
    own = torch.randn(50, generator=g, requires_grad=True)
    exclude = torch.randint(-1, 9, (50,), generator=g)
    got = sampled_cross_entropy(z, own, table, bias, exclude, chunk=chunk, mm_dtype=BF16)
    zr, tr = _rounded(z, table)
    drop = F.one_hot(exclude.clamp(min=0), 9).bool() & (exclude >= 0)[:, None]
    logits = ((zr @ tr.T).to(BF16).double() + bias.detach().double()).masked_fill(drop, float("-inf"))
    want = F.cross_entropy(torch.cat([own.detach().double()[:, None], logits], 1), torch.zeros(50, dtype=torch.long))
    assert abs(got.item() - want.item()) < 1e-5
    grads = torch.autograd.grad(got, (z, own))
    assert all(torch.isfinite(t).all() for t in grads)


def _model(kind):
    torch.manual_seed(0)
    return SeqRecModel(BackboneConfig(n_items=50, kind=kind, hidden=32, layers=2, heads=2, inner=32,
                                      max_len=20, norm="pre", head=False, activation="relu")).eval()


@pytest.mark.parametrize("kind", ["sasrec", "bert4rec"])
def test_encoder_runs_its_linear_layers_in_bf16_and_returns_float32(kind):
    m = _model(kind)
    with torch.no_grad():  # weights far from their small initial scale, so the blocks matter
        for p in m.blocks.parameters():
            p.normal_(0, 0.3)
    tokens = torch.randint(1, 51, (4, 13))  # width 13: padded to 16 inside, sliced back
    tokens[0, :6] = 0
    seen = []
    hook = m.blocks[0].ffn.fc1.register_forward_hook(lambda mod, i, o: seen.append(o.dtype))
    want = m.encode(tokens)
    with mixed_precision(m, BF16):
        got, last = m.encode(tokens), m.encode(tokens, last_only=True)
    hook.remove()
    assert seen == [torch.float32, BF16, BF16]
    assert m.compute_dtype is None  # restored
    assert got.shape == want.shape and got.dtype == torch.float32 and last.shape == (4, 1, 32)
    real = tokens != 0
    err = (got - want)[real].norm() / want[real].norm()
    assert 1e-5 < err < 3e-2  # changed by bf16 rounding (so it did run in bf16), and only by that
    torch.testing.assert_close(last[:, 0], got[:, -1], rtol=0, atol=1e-5)


def test_precision_names_resolve_and_bad_ones_are_refused(monkeypatch, tmp_path):
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is BF16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not fast_bf16(cpu) and resolve_precision("auto", cpu) is None
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert fast_bf16(cpu) and resolve_precision("auto", cpu) is BF16
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", cpu)
    with pytest.raises(RecmergeError, match="precision must be one of"):
        TrainConfig(precision="half")


@pytest.mark.parametrize("backbone", ["bert4rec", "sasrec"])
def test_bf16_training_learns_the_planted_rule_as_float32_does(tmp_path, backbone):
    ds = make_planted_dataset(tmp_path / "planted", n_users=200, n_items=50)
    scores = {}
    for precision in ("fp32", "bf16"):
        res = train(ds, TrainConfig(backbone=backbone, epochs=15, precision=precision, **SMALL),
                    tmp_path / f"{precision}.safetensors")
        model, meta = load_model(res.checkpoint)
        assert f'"precision": "{"torch.bfloat16" if precision == "bf16" else "torch.float32"}"' in meta.extra["train"]
        scores[precision] = evaluate(model, ds, split="test", protocols=("full",))["full"]["ndcg@10"]
    assert scores["bf16"] > 0.3  # the planted rule is learnt (popularity scores ~0.05 here)
    assert abs(scores["bf16"] - scores["fp32"]) < 0.1
