"""Whole-word masking (``mask_tokens(..., word_start=...)``) and the bit-identity of the default path.

The fixture below was recorded from ``mask_tokens`` as it was before whole-word masking existed
(main at ff2e90c): with ``word_start=None`` the outputs, and so the RNG stream that resumed runs
replay, must stay exactly these.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from bertopt.train import data

# shape, vocab, input seed, [SEP] every n columns (0: none), masking seed, mask_prob -> sha256, selected
PRE_WWM_FIXTURE = [
    ((4, 16), 50, 0, 0, 0, 0.15, "6afd90013a132cc4fbf20c06fc6ec177ca05b625d1957c62282f320827865e0e", 8),
    ((32, 64), 4096, 1, 0, [7, 3], 0.15, "fa7638aa65689a9ad4a6d129c6d22a18b3ee7698f317021d38dc0bd2438ff3cc", 288),
    ((32, 128), 4096, 2, 37, [0, 1000], 0.15, "450cca924914da9be630fa2682fde3c89e47af95f8ea3e391d4fb8677f03c30e", 576),
    ((8, 512), 30522, 3, 0, 5, 0.2, "e22b51f12e40fbaa0638980153ab09466bb5e4c54fc0cd297a1e7570276047a0", 816),
    ((3, 8), 200, 4, 0, 9, 0.5, "7230989cec80aee0dab3292e1aac6891973a4ee516f4045f18dfeb47940a306f", 9),
]
# the first case in full
PRE_WWM_SMALL = {
    "input_ids": [[2, 33, 28, 17, 18, 6, 8, 5, 12, 41, 34, 4, 27, 32, 48, 3],
                  [2, 29, 30, 47, 4, 4, 35, 5, 22, 43, 29, 6, 39, 37, 43, 3],
                  [2, 43, 5, 10, 8, 18, 26, 24, 23, 6, 5, 10, 5, 35, 4, 3],
                  [2, 32, 39, 22, 25, 4, 41, 49, 22, 35, 47, 4, 42, 35, 36, 3]],
    "rows": [0, 0, 1, 1, 2, 2, 3, 3],
    "cols": [3, 11, 4, 5, 3, 14, 5, 11],
    "labels": [17, 46, 17, 41, 29, 28, 49, 34],
}


def _fixture_inputs(shape, vocab, seed, sep_every):
    ids = np.random.default_rng(seed).integers(5, vocab, size=shape)
    ids[:, 0], ids[:, -1] = data.CLS_ID, data.SEP_ID
    if sep_every:
        ids[:, ::sep_every] = data.SEP_ID
        ids[:, 0] = data.CLS_ID
    return ids


def _digest(masked) -> str:
    h = hashlib.sha256()
    for a in (masked.input_ids, masked.rows, masked.cols, masked.labels):
        a = np.ascontiguousarray(np.asarray(a, dtype=np.int64))
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("case", PRE_WWM_FIXTURE, ids=lambda c: "x".join(map(str, c[0])))
def test_default_masking_is_bit_identical_to_before_whole_word_masking(case):
    shape, vocab, seed, sep_every, mask_seed, prob, sha, selected = case
    masked = data.mask_tokens(_fixture_inputs(shape, vocab, seed, sep_every), np.random.default_rng(mask_seed),
                              vocab_size=vocab, mask_prob=prob)
    assert len(masked.rows) == selected
    assert _digest(masked) == sha


def test_default_masking_small_case_in_full():
    masked = data.mask_tokens(_fixture_inputs((4, 16), 50, 0, 0), np.random.default_rng(0), vocab_size=50)
    for key, expected in PRE_WWM_SMALL.items():
        assert getattr(masked, key).tolist() == expected, key
