"""BERT's own pretraining objective: masked-LM plus next-sentence prediction, as run_pretraining.py.

Google's ``run_pretraining.py`` trains on the seven features of ``create_pretraining_data.py``
(``input_ids``, ``input_mask``, ``segment_ids``, ``masked_lm_positions``, ``masked_lm_ids``,
``masked_lm_weights``, ``next_sentence_labels``) with the loss

    masked_lm_loss     = sum(w * per_example_loss) / (sum(w) + 1e-5)      (w: masked_lm_weights)
    next_sentence_loss = mean over the examples of the cross-entropy on the pooled [CLS]
    total_loss         = masked_lm_loss + next_sentence_loss

where ``per_example_loss = -sum(log_softmax(logits) * one_hot(label))`` at each prediction slot
(padding slots point at position 0 with weight 0). :class:`MlmNspObjective` computes it on a
transformers ``BertForPreTraining``, running the last encoder layer only where outputs are read:
the masked positions of weight != 0 and [CLS] (for the pooler and the next-sentence head), with
keys and values from every unpadded token (``bertopt/train/last_layer.py``).

Gradient accumulation
---------------------
The training loop adds up ``loss_sum`` over micro-batches (and processes) and divides once by the
global ``count``. Google's two terms have different denominators (the global batch's weight sum
plus 1e-5, and its number of examples), so each micro-batch reports, with ``B`` and ``W`` the
*global* batch's number of examples and weight sum (:func:`batch_totals`, computed before the
split)::

    loss_sum = next_sentence_sum + B * masked_lm_numerator / (W + 1e-5),   count = its examples

The counts add up to ``B``, and ``sum(loss_sum) / B`` is Google's total loss of the whole batch:
``sum(next_sentence_sum) / B`` is the mean NSP loss and ``sum(masked_lm_numerator) / (W + 1e-5)``
the masked-LM loss, with the ``+ 1e-5`` exactly where Google has it, added once to the global
weight sum in float32 as TensorFlow adds it (not once per micro-batch, which would change the
loss). K micro-batches then give the one-batch loss and gradient up to float rounding
(``tests/train/test_google_objective.py``). A batch without any masked token has masked-LM loss 0
(that is what the 1e-5 is for), here as in Google's code.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from bertopt.train.last_layer import before_last_layer, last_layer_at, prunable

FEATURES = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids",
            "masked_lm_weights", "next_sentence_labels")
MASKED_LM_EPSILON = 1e-5  # run_pretraining.get_masked_lm_output: denominator = sum(weights) + 1e-5


class MlmNspTerms(NamedTuple):
    """What one (micro-)batch contributes; sums, so that micro-batches add up (module docstring)."""
    masked_lm_numerator: torch.Tensor  # sum(w * per-slot cross-entropy), differentiable
    masked_lm_weight_sum: torch.Tensor  # sum(w), float32, no gradient
    next_sentence_sum: torch.Tensor  # sum over examples of the NSP cross-entropy, differentiable
    examples: int
    masked_lm_correct: torch.Tensor  # sum(w * [argmax == label])
    next_sentence_correct: torch.Tensor  # examples whose NSP argmax is the label
    masked_lm_log_probs: torch.Tensor  # [slots of weight != 0 in (example, slot) order, vocab]
    next_sentence_log_probs: torch.Tensor  # [examples, 2]


class BatchTotals(NamedTuple):
    """The global batch's number of examples and masked-LM weight sum (float32, as TF sums it)."""
    examples: int
    masked_lm_weight_sum: float


def batch_totals(features: Mapping) -> BatchTotals:
    """:class:`BatchTotals` of a whole (global) batch of features, numpy arrays or tensors.

    Under DDP, where each rank holds only its share of the batch, the totals of the share are not
    the global ones: the caller sums ``examples`` and ``masked_lm_weight_sum`` over the ranks (one
    all-reduce, before the micro-batches run). That gives the loss of run_pretraining.py on one
    device; on TPUs Google's code instead computes each core's loss with its own share's weight sum
    and averages the cores' gradients (``CrossShardOptimizer``)."""
    weights = _numpy(features["masked_lm_weights"]).astype(np.float32)
    return BatchTotals(examples=len(weights), masked_lm_weight_sum=float(weights.sum(dtype=np.float32)))


def google_losses(terms: MlmNspTerms) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(masked_lm_loss, next_sentence_loss, total_loss)`` of one batch, run_pretraining.py's."""
    denominator = _masked_lm_denominator(float(terms.masked_lm_weight_sum))
    masked_lm_loss = terms.masked_lm_numerator / denominator
    next_sentence_loss = terms.next_sentence_sum / terms.examples
    return masked_lm_loss, next_sentence_loss, masked_lm_loss + next_sentence_loss


def loss_sum_and_count(terms: MlmNspTerms, totals: BatchTotals) -> tuple[torch.Tensor, int]:
    """The loop's ``(loss_sum, count)`` of a micro-batch of the global batch ``totals`` describes:
    summed over the micro-batches and divided by the summed counts, Google's total loss of the
    global batch (module docstring)."""
    scale = totals.examples / _masked_lm_denominator(totals.masked_lm_weight_sum)
    return terms.next_sentence_sum + terms.masked_lm_numerator * scale, terms.examples


def _masked_lm_denominator(weight_sum: float) -> float:
    # float32 arithmetic, as tf.reduce_sum(label_weights) + 1e-5 in the float32 graph.
    return float(np.float32(weight_sum) + np.float32(MASKED_LM_EPSILON))


class MlmNspObjective(torch.nn.Module):
    """Google's masked-LM + next-sentence terms of a ``BertForPreTraining`` (same submodules, so
    the same parameter names and tied weights). ``shortcut=False`` runs the full forward; the
    shortcut is also off under FSDP2 (see ``last_layer.prunable``)."""

    def __init__(self, model, shortcut: bool = True):
        super().__init__()
        self.bert = model.bert
        self.cls = model.cls
        self.shortcut = shortcut

    def forward(self, input_ids, input_mask, segment_ids, masked_lm_positions, masked_lm_ids, masked_lm_weights,
                next_sentence_labels) -> MlmNspTerms:
        weights = masked_lm_weights.float()
        # Slots of weight 0 add 0 to Google's loss and gradient: leave them out.
        rows, slots = torch.nonzero(weights, as_tuple=True)
        cols = masked_lm_positions[rows, slots].long()
        batch = input_ids.shape[0]
        if self.shortcut and prunable(self.bert):
            hidden = before_last_layer(self.bert, input_ids, input_mask, segment_ids)
            first = torch.arange(batch, device=input_ids.device)
            # One pass of the last layer at [CLS] of every example and at the masked positions.
            selected = last_layer_at(self.bert.encoder.layer[-1], hidden, torch.cat([first, rows]),
                                     torch.cat([torch.zeros_like(first), cols]), key_mask=input_mask)
            pooled = self.bert.pooler(selected[:batch, None, :])
            masked_hidden = selected[batch:]
        else:
            out = self.bert(input_ids=input_ids, attention_mask=input_mask, token_type_ids=segment_ids)
            pooled, masked_hidden = out.pooler_output, out.last_hidden_state[rows, cols]

        mlm_log_probs = F.log_softmax(self.cls.predictions(masked_hidden).float(), dim=-1)
        labels = masked_lm_ids[rows, slots].long()
        mlm_losses = -mlm_log_probs.gather(1, labels[:, None])[:, 0]
        w = weights[rows, slots]
        nsp_log_probs = F.log_softmax(self.cls.seq_relationship(pooled).float(), dim=-1)
        nsp_labels = next_sentence_labels.reshape(-1).long()
        with torch.no_grad():
            mlm_correct = (w * (mlm_log_probs.argmax(-1) == labels)).sum()
            nsp_correct = (nsp_log_probs.argmax(-1) == nsp_labels).sum()
        return MlmNspTerms(
            masked_lm_numerator=(w * mlm_losses).sum(),
            masked_lm_weight_sum=weights.sum().detach(),
            next_sentence_sum=-nsp_log_probs.gather(1, nsp_labels[:, None]).sum(),
            examples=batch,
            masked_lm_correct=mlm_correct,
            next_sentence_correct=nsp_correct,
            masked_lm_log_probs=mlm_log_probs,
            next_sentence_log_probs=nsp_log_probs,
        )


def features_to_tensors(features: Mapping, device=None) -> dict[str, torch.Tensor]:
    """The seven features (numpy arrays or tensors, Google's names and shapes) as tensors for
    :class:`MlmNspObjective`, as keyword arguments; a missing feature is a ValueError naming it."""
    missing = [name for name in FEATURES if name not in features]
    if missing:
        raise ValueError(f"pretraining features {missing} are missing; the MLM + NSP objective needs all of "
                         f"{list(FEATURES)} (Google's create_pretraining_data.py writes them)")
    return {name: torch.as_tensor(_numpy(features[name]), device=device) for name in FEATURES}


def _numpy(value):
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
