"""Weight-decay grouping: Google's name rule, module-type and rank rules, the report."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from bertopt import BERT_EXCLUDE, decay_report, param_groups


def tiny_bert():
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    return BertForMaskedLM(config)


def names(group):
    return set(group["param_names"])


def test_bert_names_follow_googles_regex_rule():
    model = tiny_bert()
    decayed, not_decayed = param_groups(model, weight_decay=0.01)
    assert decayed["weight_decay"] == 0.01 and not_decayed["weight_decay"] == 0.0
    all_names = {n for n, _ in model.named_parameters()}
    google_excluded = {n for n in all_names if any(re.search(p, n) for p in ["LayerNorm", "layer_norm", "bias"])}
    assert names(not_decayed) == google_excluded
    assert names(decayed) == all_names - google_excluded
    # concrete spot checks, so the test does not only restate the rule
    assert "bert.embeddings.LayerNorm.weight" in names(not_decayed)
    assert "bert.encoder.layer.0.attention.self.query.bias" in names(not_decayed)
    assert "bert.encoder.layer.1.intermediate.dense.weight" in names(decayed)
    assert "bert.embeddings.word_embeddings.weight" in names(decayed)
    # params and names are aligned
    lookup = dict(model.named_parameters())
    for group in (decayed, not_decayed):
        assert all(lookup[n] is p for n, p in zip(group["param_names"], group["params"]))


def test_tied_parameters_appear_once_and_frozen_ones_not_at_all():
    model = tiny_bert()  # the MLM decoder weight is tied to the word embeddings
    model.bert.embeddings.position_embeddings.weight.requires_grad_(False)
    groups = param_groups(model)
    listed = [p for g in groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed})
    assert len(listed) == sum(1 for p in model.parameters() if p.requires_grad)
    assert all("position_embeddings" not in n for g in groups for n in g["param_names"])


class OddlyNamed(nn.Module):
    """Norms whose names escape the BERT rule: RMSNorm weight, gamma/beta, a 'ln' LayerNorm."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4, bias=False)
        self.ln = nn.LayerNorm(4)
        self.rms = nn.RMSNorm(4)
        self.gamma = nn.Parameter(torch.ones(4))
        self.scale = nn.Parameter(torch.ones(()))


def test_name_rule_misses_oddly_named_norms_and_the_options_catch_them():
    model = OddlyNamed()
    (decayed,) = [g for g in param_groups(model) if g["weight_decay"] > 0]
    assert {"ln.weight", "ln.bias"} - names(decayed) == {"ln.bias"}  # only 'bias' matched by name
    assert "rms.weight" in names(decayed)

    by_type = param_groups(model, exclude_norm_layers=True)
    assert names(by_type[0]) == {"proj.weight", "gamma", "scale"}
    assert names(by_type[1]) == {"ln.weight", "ln.bias", "rms.weight"}

    by_rank = param_groups(model, exclude_ndim_below=2)
    assert names(by_rank[0]) == {"proj.weight"}


def test_roberta_style_layer_norm_names_are_excluded():
    model = nn.ModuleDict({"self_attn_layer_norm": nn.LayerNorm(3), "fc": nn.Linear(3, 3)})
    decayed, not_decayed = param_groups(model)
    assert names(not_decayed) == {"self_attn_layer_norm.weight", "self_attn_layer_norm.bias", "fc.bias"}
    assert names(decayed) == {"fc.weight"}


def test_custom_exclude_and_empty_groups_dropped():
    model = nn.Linear(3, 3)
    groups = param_groups(model, exclude=())
    assert len(groups) == 1 and names(groups[0]) == {"weight", "bias"}
    assert BERT_EXCLUDE == ("LayerNorm", "layer_norm", "bias")


def test_report_lists_every_parameter_with_the_reason():
    report = decay_report(OddlyNamed(), exclude_norm_layers=True)
    lines = {line.split()[0]: line for line in report.splitlines()[1:-1]}
    assert set(lines) == {"proj.weight", "ln.weight", "ln.bias", "rms.weight", "gamma", "scale"}
    assert "name matches 'bias'" in lines["ln.bias"]
    assert "held by a RMSNorm" in lines["rms.weight"]
    assert " yes " in lines["gamma"]
    assert report.splitlines()[-1] == "3 of 6 parameter tensors decayed"


def test_negative_weight_decay_is_rejected():
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        param_groups(nn.Linear(2, 2), weight_decay=-1)
