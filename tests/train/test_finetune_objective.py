"""bertopt finetune runs the last layer only at [CLS] (finetune.classification_objective): it must
give the logits and gradients of the full BertForSequenceClassification forward, padding included."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from bertopt.train.finetune import classification_objective  # noqa: E402


def tiny_classifier(seed=0, attention="sdpa", **config):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=3, **config)
    config._attn_implementation = attention  # how BertModel builds its mask differs between the two
    return transformers.BertForSequenceClassification(config)


def padded_batch(gen, lengths=(16, 9, 1, 12, 16)):
    input_ids = torch.randint(1, 120, (len(lengths), 16), generator=gen)
    attention_mask = (torch.arange(16)[None, :] < torch.tensor(lengths)[:, None]).long()
    return input_ids * attention_mask, attention_mask  # padding id 0 after each row's length


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_cls_only_equals_the_full_forward_with_padding(attention):
    gen = torch.Generator().manual_seed(1)
    model = tiny_classifier(attention=attention).eval()  # no dropout: the two forwards must agree exactly
    assert model.config._attn_implementation == attention
    objective = classification_objective(model)
    assert objective is not model and dict(objective.named_parameters()).keys() == dict(model.named_parameters()).keys()
    input_ids, attention_mask = padded_batch(gen)
    labels = torch.randint(0, 3, (len(input_ids),), generator=gen)

    full = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.nn.functional.cross_entropy(full, labels, reduction="sum").backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    ours = objective(input_ids, attention_mask)
    torch.nn.functional.cross_entropy(ours, labels, reduction="sum").backward()
    torch.testing.assert_close(ours, full, rtol=0, atol=2e-6)
    for name, p in objective.named_parameters():  # every parameter gets the full forward's gradient
        # (the keys' biases have no gradient in exact arithmetic: both sides are rounding noise there)
        atol = 1e-7 if name.endswith("attention.self.key.bias") else 1e-6
        torch.testing.assert_close(p.grad, full_grads[name], rtol=1e-4, atol=atol, msg=name)


def test_padding_changes_nothing_and_dropout_stays_on_in_training():
    gen = torch.Generator().manual_seed(2)
    objective = classification_objective(tiny_classifier()).eval()
    input_ids, attention_mask = padded_batch(gen, lengths=(5, 5))
    garbage = input_ids.clone()
    garbage[:, 5:] = 77  # other tokens under the padding: the logits must not move
    torch.testing.assert_close(objective(garbage, attention_mask), objective(input_ids, attention_mask), rtol=0, atol=0)
    objective.train()
    assert not torch.equal(objective(input_ids, attention_mask), objective(input_ids, attention_mask))


def test_under_bf16_autocast_too():
    gen = torch.Generator().manual_seed(3)
    model = tiny_classifier().eval()
    input_ids, attention_mask = padded_batch(gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(input_ids=input_ids, attention_mask=attention_mask).logits
        ours = classification_objective(model)(input_ids, attention_mask)
    assert ours.dtype == full.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), full.float(), rtol=0, atol=2e-4)  # logits ~0.02: a few bf16 ulps


def test_attention_it_does_not_reproduce_keeps_the_full_forward():
    # a decoder attends causally; relative positions (transformers 4.x) change the scores
    for config in ({"is_decoder": True}, {"position_embedding_type": "relative_key"}):
        model = tiny_classifier(**config)
        assert classification_objective(model) is model, config
