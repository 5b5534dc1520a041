"""Hb-BERT: Poincaré operations (gradients, boundary), the c -> 0 limit on real sentences,
HF save/reload and RBE compression through the public API."""

import geoopt
import pytest
import torch

from hf_rbe.hyperbolic import poincare as P


def _ball(c: float, dtype=torch.float64):
    return P.make_ball(c).to(dtype)


def _points(n: int, d: int, radius: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, d, generator=g, dtype=torch.float64)
    return v / v.norm(dim=-1, keepdim=True) * radius * torch.rand(n, 1, generator=g, dtype=torch.float64)


def test_exp_log_are_inverse_and_match_geoopt():
    ball = _ball(0.7)
    u = torch.randn(50, 8, dtype=torch.float64)
    x = P.expmap0(ball, u)
    torch.testing.assert_close(P.logmap0(ball, x), u, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x, ball.expmap0(u), rtol=1e-9, atol=1e-12)


def test_tiny_curvature_is_accurate_in_float32():
    # geoopt's artanh loses digits here; ours must not: log0(exp0(u)) = u to float32 precision
    ball = _ball(1e-6, torch.float32)
    u = torch.randn(100, 16)
    torch.testing.assert_close(P.logmap0(ball, P.expmap0(ball, u)), u, rtol=2e-6, atol=1e-6)


def test_gyromidpoint_matches_geoopt_and_the_euclidean_mean():
    ball = _ball(1.3)
    x = _points(6, 5, 0.8)
    w = torch.rand(3, 6, dtype=torch.float64)
    w = w / w.sum(-1, keepdim=True)
    ours = P.gyromidpoint(ball, x, w)
    for i in range(3):
        ref = ball.weighted_midpoint(x, w[i])
        torch.testing.assert_close(ours[i], ref, rtol=1e-8, atol=1e-10)
    flat = _ball(1e-12)
    torch.testing.assert_close(P.gyromidpoint(flat, x, w), w @ x, rtol=1e-8, atol=1e-10)


def test_mobius_linear_matches_geoopt_matvec_plus_bias():
    ball = _ball(0.5)
    lin = torch.nn.Linear(5, 4, bias=False).double()
    b = torch.randn(4, dtype=torch.float64) * 0.3
    x = _points(10, 5, 1.0)
    ref = ball.mobius_add(ball.mobius_matvec(lin.weight, x), ball.expmap0(b))
    torch.testing.assert_close(P.mobius_linear(ball, lin, x, b), ref, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="bias-free"):
        P.mobius_linear(ball, torch.nn.Linear(5, 4), x)


def test_gradients_pass_gradcheck():
    ball = _ball(0.9)
    lin = torch.nn.Linear(4, 3, bias=False).double()
    mlr = P.HyperbolicMLR(ball, 3, 2).double()
    x = _points(5, 4, 0.9).requires_grad_()
    w = torch.softmax(torch.randn(2, 5, dtype=torch.float64), -1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: P.gyromidpoint(ball, a, b), (x, w))
    assert torch.autograd.gradcheck(lambda a: mlr(P.mobius_linear(ball, lin, a), ball), (x,))
    c = ball.isp_c
    y = P.logmap0(ball, P.expmap0(ball, x[:, :3] * 2)).sum() + mlr(x[:, :3], ball).sum()
    (gc,) = torch.autograd.grad(y, c)
    assert torch.isfinite(gc)  # the curvature is learnable through every op


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_points_at_the_boundary_stay_finite_and_inside(dtype):
    ball = _ball(1.0, dtype)
    u = torch.randn(20, 8, dtype=dtype) * 1e3  # far past tanh saturation
    x = P.expmap0(ball, u)
    assert torch.isfinite(x).all() and (x.norm(dim=-1) < 1).all()
    edge = x / x.norm(dim=-1, keepdim=True) * (1 - 1e-9)  # closer than float32 can hold apart from 1
    for out in (P.logmap0(ball, edge), P.mobius_add(ball, edge, x.flip(0)),
                P.gyromidpoint(ball, edge, torch.full((2, 20), 0.05, dtype=dtype)),
                P.mobius_linear(ball, torch.nn.Linear(8, 8, bias=False).to(dtype), edge)):
        assert torch.isfinite(out).all()
    grad = torch.autograd.grad(P.logmap0(ball, edge.requires_grad_()).sum(), edge)[0]
    assert torch.isfinite(grad).all()


def test_bad_curvature_is_rejected():
    from hf_rbe.hyperbolic.hb_bert import HbBertConfig

    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="curvature"):
            P.make_ball(bad)
        with pytest.raises(ValueError, match="curvature"):
            HbBertConfig(curvature=bad)


# ----------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def minilm_and_batch(minilm_path, corpora):
    from transformers import AutoModel, AutoTokenizer

    from hf_rbe.data import movie_reviews

    bert = AutoModel.from_pretrained(minilm_path).eval()
    tok = AutoTokenizer.from_pretrained(minilm_path)
    batch = tok([r["text"] for r in movie_reviews()[:8]], return_tensors="pt", padding=True)
    return bert, tok, batch


@pytest.mark.slow
def test_tiny_curvature_reproduces_minilm_on_real_sentences(minilm_and_batch):
    from hf_rbe.hyperbolic.hb_bert import to_hb_bert

    bert, _, batch = minilm_and_batch
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        ref = bert(**batch).last_hidden_state[mask]
        errs = {}
        for c in (1e-6, 1e-3):
            out = to_hb_bert(bert, curvature=c).eval()(**batch).last_hidden_state[mask]
            errs[c] = float((out - ref).norm() / ref.norm())
    assert errs[1e-6] < 1e-4, errs
    assert errs[1e-3] > 10 * errs[1e-6]  # the model really is curved: the gap grows with c


@pytest.mark.slow
def test_save_reload_and_rbe_compression_through_from_pretrained(minilm_and_batch, tmp_path):
    from transformers import AutoModel, AutoModelForSequenceClassification

    from hf_rbe import RBEConfig, RBELinear
    from hf_rbe.hyperbolic.hb_bert import HbBertForSequenceClassification, HbBertModel, to_hb_bert

    bert, _, batch = minilm_and_batch
    hb = to_hb_bert(bert, curvature=0.5).eval()
    hb.save_pretrained(tmp_path / "hb")
    again = AutoModel.from_pretrained(tmp_path / "hb").eval()
    assert isinstance(again, HbBertModel) and float(again.ball.c) == pytest.approx(0.5, rel=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).last_hidden_state, hb(**batch).last_hidden_state, rtol=0, atol=0)

    q = AutoModel.from_pretrained(tmp_path / "hb", quantization_config=RBEConfig.from_preset("rbe-3")).eval()
    rbe = [m for m in q.modules() if isinstance(m, RBELinear)]
    assert len(rbe) == 6 * 6  # q, k, v, o, intermediate, output in each of the 6 layers
    with torch.no_grad():
        a, b = q(**batch).last_hidden_state, hb(**batch).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(a.mean(1), b.mean(1), dim=-1)
    assert (cos > 0.5).all() and not torch.equal(a, b)
    q.save_pretrained(tmp_path / "hb-rbe")
    q2 = AutoModel.from_pretrained(tmp_path / "hb-rbe").eval()
    with torch.no_grad():
        torch.testing.assert_close(q2(**batch).last_hidden_state, a, rtol=0, atol=0)

    clf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hb", num_labels=2)
    assert isinstance(clf, HbBertForSequenceClassification)
    assert isinstance(clf.classifier.p, geoopt.ManifoldParameter)
    out = clf(**batch, labels=torch.zeros(8, dtype=torch.long))
    out.loss.backward()
    assert clf.classifier.p.grad is not None and clf.hb_bert.ball.isp_c.grad is not None


def test_mobius_add_and_scalar_mul_match_geoopt():
    ball = _ball(0.8)
    x, y = _points(30, 6, 1.05, seed=1), _points(30, 6, 1.05, seed=2)  # radius 1/sqrt(0.8) = 1.118
    torch.testing.assert_close(P.mobius_add(ball, x, y), ball.projx(ball.mobius_add(x, y)), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(P.mobius_scalar_mul(ball, 0.5, x), ball.mobius_scalar_mul(torch.tensor(0.5, dtype=torch.float64), x),
                               rtol=1e-9, atol=1e-12)
