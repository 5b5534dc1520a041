"""Hb-BERT: a pretrained BERT moved into the Poincaré ball (paper 002), as a transformers model.

Choices (each reduces to the Euclidean BERT operation as c -> 0, so pretrained weights keep
their meaning and ``to_hb_bert(model, curvature=1e-6)`` reproduces the original):

- token states live in the ball, in units of ``state_scale`` (default sqrt(hidden_size), the
  norm of a LayerNorm output): a state h is the point exp0(h / s). The curvature is thus
  measured against unit-variance coordinates: with c = 1 the states sit at a radius where the
  geometry bends but tanh does not saturate, and the first-order departure from BERT,
  c |h / s|^2, is small for small c whatever the hidden size;
- embeddings (word + position + type, LayerNorm) enter by exp0;
- every linear layer is a ``PoincareLinear``: Möbius matrix-vector product plus Möbius bias,
  around an ordinary bias-free ``nn.Linear`` child that keeps the pretrained weight (and that
  RBE quantization replaces like any other Linear);
- attention scores are inner products of the queries' and keys' log0 images per head (a
  distance-based score would not reduce to the dot products the weights were trained for);
  values are aggregated by the weighted gyro-midpoint in each head's ball;
- residual connections are Möbius additions; LayerNorm, GELU and dropout act in the tangent
  space at the origin (log0, f, exp0), the usual "Möbius version" of a pointwise map;
- ``HbBertModel`` returns the log0 image of the final states as ``last_hidden_state`` (so mean
  pooling and every Euclidean consumer work) and the ball points as ``ball_hidden_state``;
- ``HbBertForSequenceClassification`` pools tokens by gyro-midpoint and classifies with a
  hyperbolic multinomial logistic regression (``poincare.HyperbolicMLR``).

The curvature c is one learnable scalar for the whole model (geoopt's ball parameter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.bert.modeling_bert import BertEmbeddings
from transformers.utils import ModelOutput

from . import poincare as P


class HbBertConfig(BertConfig):
    """``BertConfig`` plus the ball: ``curvature`` (c > 0 of curvature -c) and whether it trains."""

    model_type = "hb_bert"

    def __init__(self, curvature: float = 1.0, learn_curvature: bool = True, state_scale: float | None = None,
                 **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        if not (isinstance(curvature, (int, float)) and math.isfinite(curvature) and curvature > 0):
            raise ValueError(f"curvature must be a finite number > 0, got {curvature!r}")
        self.curvature = float(curvature)
        self.learn_curvature = bool(learn_curvature)
        self.state_scale = float(state_scale) if state_scale is not None else math.sqrt(self.hidden_size)
        if not self.state_scale > 0:
            raise ValueError(f"state_scale must be > 0, got {state_scale!r}")


class PoincareLinear(nn.Module):
    """``x -> (W ⊗ x) ⊕ exp0(b / s)`` on the ball. ``self.linear`` (bias-free) holds BERT's W and
    is what RBE quantizes; ``self.bias`` holds BERT's b."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor, ball, s: float) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return P.mobius_linear(ball, self.linear, x, self.bias, bias_scale=1.0 / s)


def _to_ball(ball, h: torch.Tensor, s: float) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return P.expmap0(ball, h / s)


def _from_ball(ball, x: torch.Tensor, s: float) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return P.logmap0(ball, x) * s


def _tangent(ball, fn, x: torch.Tensor, s: float) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The Möbius version of a pointwise map, in BERT's units: exp0(f(s log0(x)) / s)."""
    return _to_ball(ball, fn(_from_ball(ball, x, s)), s)


class HbBertAttention(nn.Module):
    def __init__(self, config: HbBertConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.heads, self.head_dim = config.num_attention_heads, h // config.num_attention_heads
        self.query, self.key, self.value, self.output = (PoincareLinear(h, h) for _ in range(4))
        self.layer_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.attn_dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def _split(self, ball, x: torch.Tensor, s: float) -> torch.Tensor:  # type: ignore[no-untyped-def]
        b, n, _ = x.shape
        return _from_ball(ball, x, s).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # tangent, per head

    def forward(self, x: torch.Tensor, mask: torch.Tensor, ball, s: float) -> torch.Tensor:  # type: ignore[no-untyped-def]
        q, k = self._split(ball, self.query(x, ball, s), s), self._split(ball, self.key(x, ball, s), s)
        v = _to_ball(ball, self._split(ball, self.value(x, ball, s), s), s)  # each head's values in its own ball
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask
        ctx = P.gyromidpoint(ball, v, self.attn_dropout(scores.softmax(-1)))
        b, _, n, _ = ctx.shape
        ctx = _to_ball(ball, _from_ball(ball, ctx, s).transpose(1, 2).reshape(b, n, -1), s)
        out = _tangent(ball, self.dropout, self.output(ctx, ball, s), s)
        return _tangent(ball, self.layer_norm, P.mobius_add(ball, x, out), s)


class HbBertLayer(nn.Module):
    def __init__(self, config: HbBertConfig) -> None:
        super().__init__()
        self.attention = HbBertAttention(config)
        self.intermediate = PoincareLinear(config.hidden_size, config.intermediate_size)
        self.output = PoincareLinear(config.intermediate_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        if config.hidden_act != "gelu":
            raise ValueError(f"Hb-BERT implements hidden_act='gelu' (BERT's), got {config.hidden_act!r}")

    def forward(self, x: torch.Tensor, mask: torch.Tensor, ball, s: float) -> torch.Tensor:  # type: ignore[no-untyped-def]
        x = self.attention(x, mask, ball, s)
        inner = _tangent(ball, F.gelu, self.intermediate(x, ball, s), s)
        out = _tangent(ball, self.dropout, self.output(inner, ball, s), s)
        return _tangent(ball, self.layer_norm, P.mobius_add(ball, x, out), s)


@dataclass
class HbBertOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None  # s log0 of the final ball states (Euclidean consumers)
    ball_hidden_state: torch.Tensor | None = None  # the final states as points of the ball


class HbBertPreTrainedModel(PreTrainedModel):
    config_class = HbBertConfig
    base_model_prefix = "hb_bert"
    _no_split_modules = ["HbBertLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers' initialisers skip tensors that a checkpoint has already filled
        super()._init_weights(module)
        if isinstance(module, BertEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
            init.zeros_(module.token_type_ids)
        elif isinstance(module, PoincareLinear):
            init.zeros_(module.bias)
        elif isinstance(module, P.HyperbolicMLR):
            init.zeros_(module.p)
            init.normal_(module.a, 0.0, module.a.shape[-1] ** -0.5)
        elif isinstance(module, HbBertModel):
            init.copy_(module.ball.isp_c, P.inverse_softplus(self.config.curvature).to(module.ball.isp_c.dtype))


class HbBertModel(HbBertPreTrainedModel):
    """The encoder on the ball. ``last_hidden_state`` is Euclidean (log0); see the module doc."""

    def __init__(self, config: HbBertConfig) -> None:
        super().__init__(config)
        self.ball = P.make_ball(config.curvature, learnable=config.learn_curvature)
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(HbBertLayer(config) for _ in range(config.num_hidden_layers))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embeddings.word_embeddings = value

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> HbBertOutput:  # type: ignore[no-untyped-def]
        h = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids,
                            inputs_embeds=inputs_embeds)
        if attention_mask is None:
            attention_mask = torch.ones(h.shape[:2], dtype=torch.long, device=h.device)
        mask = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        s = self.config.state_scale
        x = _to_ball(self.ball, h, s)
        for layer in self.layers:
            x = layer(x, mask, self.ball, s)
        return HbBertOutput(last_hidden_state=_from_ball(self.ball, x, s), ball_hidden_state=x)


class HbBertForSequenceClassification(HbBertPreTrainedModel):
    """Gyro-midpoint pooling of the tokens, then a hyperbolic MLR head (``classifier``)."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):  # type: ignore[no-untyped-def,override]
        # loading materialises parameters as plain nn.Parameter; the class points must stay
        # geoopt.ManifoldParameter so that Riemannian Adam keeps them on the ball
        import geoopt

        model = super().from_pretrained(*args, **kwargs)
        p = model.classifier.p
        if not isinstance(p, geoopt.ManifoldParameter):
            model.classifier.p = geoopt.ManifoldParameter(p.data, manifold=model.hb_bert.ball,
                                                          requires_grad=p.requires_grad)
        return model

    def __init__(self, config: HbBertConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.hb_bert = HbBertModel(config)
        self.classifier = P.HyperbolicMLR(self.hb_bert.ball, config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs) -> SequenceClassifierOutput:  # type: ignore[no-untyped-def]
        out = self.hb_bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        x = out.ball_hidden_state
        m = torch.ones(x.shape[:2], device=x.device) if attention_mask is None else attention_mask.to(x.dtype)
        pooled = P.gyromidpoint(self.hb_bert.ball, x, (m / m.sum(-1, keepdim=True))[:, None, :])[:, 0]
        logits = self.classifier(pooled, self.hb_bert.ball)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)



# BERT name -> Hb-BERT name, per encoder layer (the rest of the names are equal)
_LAYER_MAP = {
    "attention.self.query": "attention.query.linear", "attention.self.key": "attention.key.linear",
    "attention.self.value": "attention.value.linear", "attention.output.dense": "attention.output.linear",
    "attention.output.LayerNorm": "attention.layer_norm", "intermediate.dense": "intermediate.linear",
    "output.dense": "output.linear", "output.LayerNorm": "layer_norm",
}


def to_hb_bert(model: BertModel, curvature: float = 1.0, learn_curvature: bool = True,
               state_scale: float | None = None) -> HbBertModel:
    """An ``HbBertModel`` carrying ``model``'s pretrained weights (the pooler is dropped: Hb-BERT
    pools by gyro-midpoint). ``model`` is left unchanged."""
    if not isinstance(model, BertModel):
        raise TypeError(f"to_hb_bert takes a transformers BertModel, got {type(model).__name__}")
    cfg = model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "quantization_config"):
        cfg.pop(key, None)
    if "quantization_config" in model.config.to_dict():
        raise ValueError("convert the unquantized BERT, then quantize the Hb-BERT (from_pretrained with RBEConfig)")
    hb = HbBertModel(HbBertConfig(curvature=curvature, learn_curvature=learn_curvature, state_scale=state_scale, **cfg))
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("pooler."):
            continue
        if name.startswith("encoder.layer."):
            _, _, idx, rest = name.split(".", 3)
            module, leaf = rest.rsplit(".", 1)
            target = _LAYER_MAP[module]
            if target.endswith(".linear") and leaf == "bias":  # the bias sits beside the bias-free Linear
                target = target[: -len(".linear")]
            name = f"layers.{idx}.{target}.{leaf}"
        state[name] = tensor.detach().clone()
    missing, unexpected = hb.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "ball.isp_c"]:
        raise ValueError(f"BERT -> Hb-BERT name mapping failed: missing {missing}, unexpected {unexpected}")
    return hb.to(next(model.parameters()).dtype)
