"""Google's masked-LM + next-sentence objective (bertopt.train.google_objective) on a random tiny
BertForPreTraining: the last-layer shortcut equals the full forward with padding and segment ids,
and K micro-batches give the one-batch loss and gradients. Equality with TensorFlow's
run_pretraining.py is tests/interop/test_google_model.py."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from bertopt.train.google_objective import (  # noqa: E402
    MlmNspObjective, batch_totals, features_to_tensors, google_losses, loss_sum_and_count)
from bertopt.train.last_layer import before_last_layer  # noqa: E402

VOCAB, SEQ, PREDS = 60, 12, 4


def tiny_model(seed=0, attention="sdpa"):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=32, max_position_embeddings=SEQ, initializer_range=0.3)
    config._attn_implementation = attention
    return transformers.BertForPreTraining(config).eval()  # dropout off: the paths must agree exactly


def features(seed=1, batch=8):
    """Google-shaped features: [CLS] A [SEP] B [SEP] then padding; a varying number of prediction
    slots used per example (the rest weight 0), one example without any."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(6, SEQ + 1, (batch,), generator=gen)
    positions = torch.arange(SEQ)[None, :]
    input_mask = (positions < lengths[:, None]).long()
    input_ids = torch.randint(5, VOCAB, (batch, SEQ), generator=gen) * input_mask
    input_ids[:, 0] = 2
    split = lengths // 2
    segment_ids = ((positions > split[:, None]) & (input_mask > 0)).long()
    used = torch.arange(batch) % (PREDS + 1)  # 0..PREDS slots used
    masked_lm_positions = torch.zeros(batch, PREDS, dtype=torch.long)
    masked_lm_weights = torch.zeros(batch, PREDS)
    for i in range(batch):
        chosen = torch.randperm(int(lengths[i]) - 1, generator=gen)[: int(used[i])] + 1
        masked_lm_positions[i, : len(chosen)] = chosen.sort().values
        masked_lm_weights[i, : len(chosen)] = 1.0
    masked_lm_ids = torch.randint(5, VOCAB, (batch, PREDS), generator=gen) * (masked_lm_weights > 0)
    next_sentence_labels = torch.randint(0, 2, (batch, 1), generator=gen)
    return features_to_tensors(dict(
        input_ids=input_ids, input_mask=input_mask, segment_ids=segment_ids, masked_lm_positions=masked_lm_positions,
        masked_lm_ids=masked_lm_ids, masked_lm_weights=masked_lm_weights, next_sentence_labels=next_sentence_labels))


def loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_before_last_layer_takes_segments_and_padding():
    model, f = tiny_model(), features()
    hidden = before_last_layer(model.bert, f["input_ids"], f["input_mask"], f["segment_ids"])
    full = model.bert(input_ids=f["input_ids"], attention_mask=f["input_mask"], token_type_ids=f["segment_ids"],
                      output_hidden_states=True).hidden_states[-2]
    real = f["input_mask"].bool()
    torch.testing.assert_close(hidden[real], full[real], rtol=0, atol=1e-6)
    # Without token_type_ids it is the model's own default (all 0), as before.
    torch.testing.assert_close(before_last_layer(model.bert, f["input_ids"], f["input_mask"])[real],
                               model.bert(input_ids=f["input_ids"], attention_mask=f["input_mask"],
                                          output_hidden_states=True).hidden_states[-2][real], rtol=0, atol=1e-6)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shortcut_equals_full_forward(attention):
    model, f = tiny_model(attention=attention), features()
    results = {}
    for shortcut in (True, False):
        objective = MlmNspObjective(model, shortcut=shortcut)
        terms = objective(**f)
        results[shortcut] = terms, *loss_and_grads(model, lambda: google_losses(objective(**f))[2])
    (short, short_loss, short_grads), (full, full_loss, full_grads) = results[True], results[False]
    torch.testing.assert_close(short.masked_lm_log_probs, full.masked_lm_log_probs, rtol=0, atol=2e-6)
    torch.testing.assert_close(short.next_sentence_log_probs, full.next_sentence_log_probs, rtol=0, atol=2e-6)
    torch.testing.assert_close(short_loss, full_loss, rtol=1e-6, atol=0)
    assert short_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        # (the keys' biases have no gradient in exact arithmetic: both sides are rounding noise there)
        atol = 1e-7 if name.endswith("attention.self.key.bias") else 1e-6
        torch.testing.assert_close(short_grads[name], grad, rtol=1e-4, atol=atol, msg=name)
    # Tokens under the padding do not matter.
    garbage = dict(f, input_ids=torch.where(f["input_mask"] > 0, f["input_ids"], 33))
    torch.testing.assert_close(MlmNspObjective(model)(**garbage).masked_lm_log_probs, short.masked_lm_log_probs,
                               rtol=0, atol=0)


def test_google_loss_formula():
    model, f = tiny_model(), features()
    # Weights other than 1 (Google's data has 1 and 0; the formula weights each slot's loss).
    f["masked_lm_weights"] = f["masked_lm_weights"] * torch.linspace(0.25, 2.0, f["masked_lm_weights"].numel()).view(
        f["masked_lm_weights"].shape)
    terms = MlmNspObjective(model)(**f)
    mlm, nsp, total = google_losses(terms)
    w = f["masked_lm_weights"]
    labels = f["masked_lm_ids"][w > 0]
    nll = -terms.masked_lm_log_probs[torch.arange(len(labels)), labels]
    expected_mlm = (w[w > 0] * nll).sum() / (w.sum() + 1e-5)
    assert abs(float(expected_mlm.detach()) - float((nll.sum() / (w.sum() + 1e-5)).detach())) > 1e-3  # weighting matters
    expected_nsp = -terms.next_sentence_log_probs[torch.arange(8), f["next_sentence_labels"][:, 0]].mean()
    torch.testing.assert_close(mlm, expected_mlm, rtol=1e-6, atol=0)
    torch.testing.assert_close(nsp, expected_nsp, rtol=1e-6, atol=0)
    torch.testing.assert_close(total, mlm + nsp, rtol=0, atol=0)
    # No masked token in the batch: the masked-LM loss is 0 (the 1e-5), the total the NSP loss.
    with torch.no_grad():
        none = MlmNspObjective(model)(**dict(f, masked_lm_weights=torch.zeros_like(w)))
    assert float(google_losses(none)[0]) == 0.0 and float(google_losses(none)[2]) == float(google_losses(none)[1])


def test_micro_batches_equal_one_batch():
    """K=4 micro-batches with the loop's contract (sum loss_sum, divide once by the summed count)
    give Google's one-batch loss and gradients; averaging each micro-batch's own Google loss does not."""
    model, f = tiny_model(), features(batch=8)
    objective = MlmNspObjective(model)
    one_loss, one_grads = loss_and_grads(model, lambda: google_losses(objective(**f))[2])

    totals = batch_totals(f)
    parts = [{k: v[i:i + 2] for k, v in f.items()} for i in range(0, 8, 2)]
    assert len({float(p["masked_lm_weights"].sum()) for p in parts}) > 1  # micro-batches of unequal weight

    def accumulated():
        sums, counts = zip(*(loss_sum_and_count(objective(**part), totals) for part in parts))
        return sum(sums) / sum(counts)

    acc_loss, acc_grads = loss_and_grads(model, accumulated)
    torch.testing.assert_close(acc_loss, one_loss, rtol=1e-6, atol=0)
    for name, grad in one_grads.items():
        torch.testing.assert_close(acc_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():
        naive = sum(float(google_losses(objective(**part))[2]) for part in parts) / len(parts)
    assert abs(naive - float(one_loss)) > 1e-2  # the decomposition is what makes them equal


def test_missing_feature_is_named():
    f = {k: v for k, v in features().items() if k != "segment_ids"}
    with pytest.raises(ValueError, match="segment_ids"):
        features_to_tensors(f)
