"""Hyperbolic models (paper 002): Poincaré-ball operations and Hb-BERT, a BERT in the ball.

    poincare    exp/log maps, Möbius operations, gyro-midpoint, hyperbolic MLR (on geoopt)
    hb_bert     HbBertConfig / HbBertModel / HbBertForSequenceClassification, to_hb_bert

Importing this package registers Hb-BERT with the Auto classes (``hf_rbe/__init__`` does so as
soon as transformers is imported), so saved Hb-BERT checkpoints load with ``from_pretrained``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from .hb_bert import HbBertConfig, HbBertForSequenceClassification, HbBertModel, to_hb_bert

AutoConfig.register(HbBertConfig.model_type, HbBertConfig, exist_ok=True)
AutoModel.register(HbBertConfig, HbBertModel, exist_ok=True)
AutoModelForSequenceClassification.register(HbBertConfig, HbBertForSequenceClassification, exist_ok=True)

__all__ = ["HbBertConfig", "HbBertForSequenceClassification", "HbBertModel", "to_hb_bert"]
