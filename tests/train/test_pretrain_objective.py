"""The pretraining objective runs the last layer only at the masked positions
(last_layer.last_layer_at): it must give what the full BertForMaskedLM forward gives there."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from bertopt.train.pretrain import masked_lm_objective  # noqa: E402


def tiny_mlm(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16)
    return transformers.BertForMaskedLM(config)


def masked_positions(batch, seq, gen):
    mask = torch.rand(batch, seq, generator=gen) < 0.2
    mask[0] = False  # a row without any masked token
    mask[1, :] = True  # a row where every token is
    rows, cols = mask.nonzero(as_tuple=True)
    perm = torch.randperm(len(rows), generator=gen)  # any order of positions
    return rows[perm], cols[perm]


def test_masked_positions_only_equals_the_full_forward():
    gen = torch.Generator().manual_seed(1)
    mlm = tiny_mlm().eval()
    input_ids = torch.randint(0, 120, (5, 16), generator=gen)
    rows, cols = masked_positions(5, 16, gen)
    labels = torch.randint(0, 120, (len(rows),), generator=gen)
    objective = masked_lm_objective(mlm)

    full_logits = mlm(input_ids=input_ids).logits[rows, cols]
    full_loss = torch.nn.functional.cross_entropy(full_logits, labels, reduction="sum")
    full_loss.backward()
    full_grads = {n: p.grad.clone() for n, p in objective.named_parameters()}
    objective.zero_grad(set_to_none=True)

    loss, correct = objective(input_ids, rows, cols, labels)
    loss.backward()
    torch.testing.assert_close(objective.encode_at(input_ids, rows, cols),
                               mlm.bert(input_ids=input_ids).last_hidden_state[rows, cols], rtol=0, atol=2e-6)
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=0)
    assert correct == (full_logits.argmax(-1) == labels).sum()
    for name, p in objective.named_parameters():  # every parameter gets the full forward's gradient
        torch.testing.assert_close(p.grad, full_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_dropout_stays_on_in_training():
    # In training the selected positions still see attention and hidden dropout: two calls differ.
    gen = torch.Generator().manual_seed(2)
    objective = masked_lm_objective(tiny_mlm()).train()
    input_ids = torch.randint(0, 120, (3, 16), generator=gen)
    rows, cols = masked_positions(3, 16, gen)
    assert not torch.equal(objective.encode_at(input_ids, rows, cols), objective.encode_at(input_ids, rows, cols))
