"""The last encoder layer of a BERT run only where its output is read.

A loss that reads the final hidden states at a few positions (the masked tokens of MLM
pretraining, [CLS] for sequence classification) needs the last layer's queries, attention
output and feed-forward there alone; its keys and values still come from every token. Same
outputs and gradients as the full forward, through the layer's own modules
(``tests/train/test_pretrain_objective.py``, ``tests/train/test_finetune_objective.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # a torch without FSDP2
    FSDPModule = None


def prunable(bert) -> bool:
    """Whether the encoder's layers may be called one by one: not under FSDP2, which unshards a
    block only when that block's own forward runs (then the full forward is kept)."""
    return FSDPModule is None or not isinstance(bert.encoder.layer[-1], FSDPModule)


def before_last_layer(bert, input_ids, attention_mask=None, token_type_ids=None):
    """A BertModel's embeddings and every encoder layer but the last: [batch, seq, width].
    ``attention_mask`` [batch, seq] (1 at tokens, 0 at padding) becomes BERT's additive mask;
    None: full rows. ``token_type_ids`` [batch, seq] (BERT's segment ids, 0 for sentence A and 1
    for B); None: all 0, as the model's own forward takes it."""
    hidden = bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    additive = None if attention_mask is None else \
        (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
    for layer in bert.encoder.layer[:-1]:
        out = layer(hidden, attention_mask=additive)
        hidden = out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple
    return hidden


def last_layer_at(layer, hidden, rows, cols, key_mask=None):
    """A BertLayer's output at the positions (rows, cols) of ``hidden`` [batch, seq, width]: queries
    from those positions, keys and values from every position of their row (where ``key_mask``
    [batch, seq], if given, is nonzero: padding is left out), then the layer's own attention-output
    and feed-forward modules on the selected positions only."""
    batch, _, width = hidden.shape
    # The selected positions of each row side by side (slot: rank within its row), padded to
    # the longest row's count.
    counts = torch.bincount(rows, minlength=batch)
    order = torch.argsort(rows, stable=True)
    slot = torch.empty_like(rows)
    slot[order] = torch.arange(len(rows), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows[order]]
    width_q = int(counts.max()) if len(rows) else 0
    selected = hidden[rows, cols]
    q_selected = layer.attention.self.query(selected)  # under autocast, in its dtype
    q = q_selected.new_zeros(batch, width_q, width).index_put((rows, slot), q_selected)
    context = _attend(layer, q, hidden, key_mask)[rows, slot]
    return _after_attention(layer, context, selected)


def first_position_of_last_layer(layer, hidden, key_mask=None):
    """``last_layer_at`` at position 0 of every row (what a [CLS] classifier reads): [batch, width],
    without the bookkeeping for positions in any order (so torch.compile sees one graph)."""
    first = hidden[:, 0]
    context = _attend(layer, layer.attention.self.query(first)[:, None, :], hidden, key_mask)[:, 0]
    return _after_attention(layer, context, first)


def _attend(layer, q, hidden, key_mask):
    """BERT's self-attention of the projected queries ``q`` [batch, n, width] over each row of
    ``hidden`` (keys and values from every position, or where ``key_mask`` is nonzero)."""
    attn = layer.attention.self
    batch, n, width = q.shape
    heads, head_dim = attn.num_attention_heads, attn.attention_head_size

    def split_heads(x):
        return x.view(batch, -1, heads, head_dim).transpose(1, 2)

    context = F.scaled_dot_product_attention(
        split_heads(q), split_heads(attn.key(hidden)), split_heads(attn.value(hidden)),
        attn_mask=None if key_mask is None else key_mask[:, None, None, :].bool(),
        dropout_p=attn.dropout.p if attn.training else 0.0)  # default scale 1/sqrt(head_dim), as BERT's
    return context.transpose(1, 2).reshape(batch, n, width)


def _after_attention(layer, context, residual):
    """The layer's attention-output (with the residual) and feed-forward modules."""
    attention_output = layer.attention.output(context, residual)
    return layer.output(layer.intermediate(attention_output), attention_output)
