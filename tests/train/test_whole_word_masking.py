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


# --- whole-word masking ---------------------------------------------------------------------------

SPECIALS = (data.PAD_ID, data.UNK_ID, data.CLS_ID, data.SEP_ID, data.MASK_ID)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """Real WordPiece rows: the synthetic corpus with a vocabulary small enough that many words
    (the document numbers, longer words) are split into ``##`` pieces."""
    from _corpus import write_corpus

    root = tmp_path_factory.mktemp("wwm")
    corpus = data.text_corpus([write_corpus(root / "corpus", documents=400, sentences=3)])
    prepared = data.prepare_data(corpus, root / "cache", vocab_size=120, seq_len=48, log=lambda m: None)
    tokenizer = prepared.load_tokenizer()
    return np.asarray(prepared.train, dtype=np.int64), tokenizer, prepared.vocab_size


def _words(row, is_piece, specials=SPECIALS):
    """Words of a row by the documented rule, from the tokenizer's pieces, in a plain loop: a token
    begins a word unless it is a ``##`` piece right after a piece of the same word."""
    words, previous_special = [], True
    for col, token in enumerate(row):
        if token in specials:
            previous_special = True
            continue
        if is_piece[token] and not previous_special:
            words[-1].append(col)
        else:
            words.append([col])
        previous_special = False
    return words


def _google_reference(ids, scores, is_piece, mask_prob=0.15):
    """create_pretraining_data.py's selection with do_whole_word_mask, one row at a time, with the
    words shuffled by the score of their first piece (the random order mask_tokens draws)."""
    selected = np.zeros(ids.shape, dtype=bool)
    for r, row in enumerate(ids.tolist()):
        words = _words(row, is_piece)
        n_candidates = sum(len(w) for w in words)
        num_to_predict = min(n_candidates, max(1, round(n_candidates * mask_prob)))
        chosen = []
        for word in sorted(words, key=lambda w: scores[r, w[0]]):
            if len(chosen) >= num_to_predict:
                break
            if len(chosen) + len(word) > num_to_predict:
                continue
            chosen.extend(word)
        selected[r, chosen] = True
    return selected


def test_word_start_table_marks_continuation_pieces(packed):
    _, tokenizer, vocab = packed
    table = data.word_start_table(tokenizer)
    assert table.dtype == bool and table.shape == (vocab,)
    for token, i in tokenizer.get_vocab().items():
        assert table[i] == (not token.startswith("##")), token
    assert table[list(SPECIALS)].all()
    assert 10 < (~table).sum() < vocab - 10  # the small vocabulary does split words


def test_whole_words_are_masked_together_as_google_selects_them(packed):
    ids, tokenizer, vocab = packed
    ids = ids[:256]
    table = data.word_start_table(tokenizer)
    is_piece = {i: tokenizer.id_to_token(i).startswith("##") for i in range(vocab)}
    masked = data.mask_tokens(ids, np.random.default_rng(3), vocab_size=vocab, word_start=table)
    selected = np.zeros(ids.shape, dtype=bool)
    selected[masked.rows, masked.cols] = True
    n_multi_piece = 0
    for r, row in enumerate(ids.tolist()):
        for word in _words(row, is_piece):
            assert selected[r, word].all() or not selected[r, word].any(), (r, word)  # never partly masked
            n_multi_piece += len(word) > 1 and selected[r, word].all()
    assert n_multi_piece > 100  # the check above is not vacuous
    # exactly Google's greedy selection over the same shuffle of words
    scores = np.random.default_rng(3).random(ids.shape)  # mask_tokens' first draw
    assert np.array_equal(selected, _google_reference(ids, scores, is_piece))
    # count per row: at most round(15% of the candidates), and close to it
    n_candidates = (~np.isin(ids, SPECIALS)).sum(axis=1)
    target = np.maximum(1, np.round(n_candidates * 0.15))
    per_row = selected.sum(axis=1)
    assert (per_row <= target).all()
    assert per_row.sum() >= 0.97 * target.sum() and (per_row >= target - 2).mean() > 0.97
    assert np.array_equal(masked.labels, ids[masked.rows, masked.cols])
    assert not np.isin(masked.labels, SPECIALS).any()


def test_whole_word_greedy_skips_a_word_that_does_not_fit():
    # row: [CLS] a ##b ##c d e [SEP]; 5 candidates -> round(0.75) = 1 prediction at p=0.15:
    # the 3-piece word never fits, so a single-piece word is always the one chosen
    table = np.ones(20, dtype=bool)
    table[[11, 12]] = False  # 11, 12 are ## pieces
    ids = np.tile([data.CLS_ID, 10, 11, 12, 13, 14, data.SEP_ID], (2000, 1))
    masked = data.mask_tokens(ids, np.random.default_rng(0), vocab_size=20, word_start=table)
    assert (np.bincount(masked.rows, minlength=2000) == 1).all()
    assert set(masked.cols.tolist()) == {4, 5}
    # at p=0.6 (3 predictions): the 3-piece word alone, or d and e plus nothing else that fits
    masked = data.mask_tokens(ids, np.random.default_rng(1), vocab_size=20, mask_prob=0.6, word_start=table)
    chosen = [tuple(masked.cols[masked.rows == r]) for r in range(2000)]
    assert set(chosen) == {(1, 2, 3), (4, 5)}  # never 1 alone: its word needs 3
    # Google: the 3-piece word is first in the shuffle 1/3 of the time; else d, e, then it does not fit
    assert abs(chosen.count((1, 2, 3)) / 2000 - 1 / 3) < 0.05


def test_continuation_pieces_after_special_tokens_start_their_own_word():
    table = np.ones(20, dtype=bool)
    table[[11, 12]] = False
    # a word split across packed rows: the row opens with ##pieces; and a ## piece right after [SEP]
    ids = np.array([[data.CLS_ID, 11, 12, 10, 11, data.SEP_ID, 12, 13, 14, data.SEP_ID]] * 3000)
    masked = data.mask_tokens(ids, np.random.default_rng(5), vocab_size=20, mask_prob=0.5, word_start=table)
    words = {(1, 2), (3, 4), (6,), (7,), (8,)}
    for r in range(0, 3000, 7):
        cols = set(masked.cols[masked.rows == r].tolist())
        assert all(set(w) <= cols or not set(w) & cols for w in words), cols
    assert {0, 5, 9}.isdisjoint(masked.cols.tolist())
    assert np.isin([1, 3, 6], masked.cols).all()  # each kind of word does get chosen


def test_whole_word_replacement_is_80_10_10_per_token(packed):
    ids, tokenizer, vocab = packed
    ids = np.concatenate([ids] * 4)[:4000]
    masked = data.mask_tokens(ids, np.random.default_rng(11), vocab_size=vocab, word_start=data.word_start_table(tokenizer))
    chosen = masked.input_ids[masked.rows, masked.cols]
    n = len(chosen)
    assert n > 15_000
    frac_mask = np.mean(chosen == data.MASK_ID)
    frac_random = np.mean((chosen != data.MASK_ID) & (chosen != masked.labels))
    # a random token equals the original with probability ~1/vocab: "kept" is 0.1 + 0.1/115
    frac_kept = 1 - frac_mask - frac_random
    sigma = np.sqrt(0.1 * 0.9 / n)  # <= 0.0025
    assert abs(frac_mask - 0.8) < 4 * np.sqrt(0.16 / n)
    assert abs(frac_kept - 0.1 - 0.1 / (vocab - 5)) < 4 * sigma
    assert abs(frac_random - 0.1 + 0.1 / (vocab - 5)) < 4 * sigma
    assert chosen[chosen != data.MASK_ID].min() >= 5  # random tokens are never special
    # per token, not per word: the pieces of one masked word do not all share one fate
    rows, cols = masked.rows, masked.cols
    same_word_next = (np.diff(rows) == 0) & (np.diff(cols) == 1)
    fate = np.where(chosen == data.MASK_ID, 0, np.where(chosen == masked.labels, 1, 2))
    assert (fate[:-1][same_word_next] != fate[1:][same_word_next]).mean() > 0.2
    unselected = np.ones(ids.shape, dtype=bool)
    unselected[rows, cols] = False
    assert np.array_equal(masked.input_ids[unselected], ids[unselected])


def test_whole_word_masking_is_deterministic_and_seed_dependent(packed):
    ids, tokenizer, vocab = packed
    table = data.word_start_table(tokenizer)
    a = data.mask_tokens(ids[:64], np.random.default_rng([1, 7]), vocab_size=vocab, word_start=table)
    b = data.mask_tokens(ids[:64], np.random.default_rng([1, 7]), vocab_size=vocab, word_start=table)
    c = data.mask_tokens(ids[:64], np.random.default_rng([1, 8]), vocab_size=vocab, word_start=table)
    assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("input_ids", "rows", "cols", "labels"))
    assert not np.array_equal(a.input_ids, c.input_ids)


def test_whole_word_masking_never_selects_special_tokens():
    rng = np.random.default_rng(0)
    table = rng.random(300) < 0.6
    ids = rng.integers(5, 300, size=(500, 40))
    for special in SPECIALS:  # every special token, anywhere, including runs of them
        ids[rng.random(ids.shape) < 0.05] = special
    ids[:, 0], ids[:, -1] = data.CLS_ID, data.SEP_ID
    masked = data.mask_tokens(ids, np.random.default_rng(1), vocab_size=300, word_start=table)
    assert not np.isin(masked.labels, SPECIALS).any()
    assert len(masked.rows) > 0.9 * np.round((~np.isin(ids, SPECIALS)).sum() * 0.15)
    all_special = np.full((2, 6), data.PAD_ID)  # a row with no candidate selects nothing
    assert len(data.mask_tokens(all_special, rng, vocab_size=300, word_start=table).rows) == 0


def test_word_start_must_cover_the_ids():
    ids = np.array([[data.CLS_ID, 7, 30, data.SEP_ID]])
    with pytest.raises(ValueError, match="outside word_start"):
        data.mask_tokens(ids, np.random.default_rng(0), vocab_size=50, word_start=np.ones(30, dtype=bool))
