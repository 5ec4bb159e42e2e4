"""A Google BERT imported from its TF checkpoint (bertopt.interop.google) computes what Google's
modeling.py + run_pretraining.py computed, and continues its run as TensorFlow did.

Fixture: tests/interop/google_model/ (record_google_model.py, run under TensorFlow with Google's
own code; README.md there): a tiny BERT trained 5 steps by Google's code and saved by
tf.train.Saver (weights, adam_m/adam_v, global_step), its outputs on an eval batch, and 3 more
training steps on recorded batches with their losses, LRs and every variable after them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import bertopt  # noqa: E402
from bertopt.errors import UsageError  # noqa: E402
from bertopt.interop.google import (  # noqa: E402
    export_tf_checkpoint, from_google_variables, google_variables, import_tf_checkpoint)
from bertopt.interop.tf_checkpoint import read_tf_checkpoint, write_tf_checkpoint  # noqa: E402
from bertopt.train.google_objective import (  # noqa: E402
    FEATURES, MlmNspObjective, features_to_tensors, google_losses)

HERE = Path(__file__).parent / "google_model"
META = json.loads((HERE / "google_model.json").read_text())
RECORDED = np.load(HERE / "google_model.npz")
CKPT = HERE / META["checkpoint"]
CONFIG = HERE / "bert_config.json"


def batch(prefix):
    return {name: RECORDED[f"{prefix}/{name}"] for name in FEATURES}


@pytest.fixture(scope="module")
def tensors():
    return read_tf_checkpoint(CKPT)


def test_outputs_equal_googles(tensors):
    imported = from_google_variables(tensors, CONFIG)
    assert imported.notes == [] and imported.global_step == META["settings"]["google_run_steps"]
    assert imported.config.hidden_act == "gelu_pytorch_tanh" and imported.config.layer_norm_eps == 1e-12
    model = imported.model().eval()
    f = batch("eval")
    slots = f["masked_lm_weights"].reshape(-1) != 0  # Google also predicts at the padding slots, weight 0
    results = []
    for shortcut in (True, False):
        with torch.no_grad():
            terms = MlmNspObjective(model, shortcut=shortcut)(**features_to_tensors(f))
        losses = [float(x) for x in google_losses(terms)]
        for ours, name in zip(losses, ("masked_lm_loss", "next_sentence_loss", "total_loss")):
            assert ours == pytest.approx(float(RECORDED[f"eval/{name}"]), rel=1e-6, abs=0), name
        mlm_lp = terms.masked_lm_log_probs.numpy()
        np.testing.assert_allclose(mlm_lp, RECORDED["eval/masked_lm_log_probs"][slots], rtol=0, atol=1e-5)
        np.testing.assert_allclose(terms.next_sentence_log_probs.numpy(), RECORDED["eval/next_sentence_log_probs"],
                                   rtol=0, atol=1e-5)
        results.append(mlm_lp)
    np.testing.assert_allclose(results[0], results[1], rtol=0, atol=2e-6)  # shortcut = full forward


def continue_run(tensors, steps):
    """BertForPreTraining + bertopt's BertAdam and schedule at the imported step, then the
    recorded batches with Google's loss, dropout off: ([(loss, lr)], model, optimizer)."""
    settings = META["settings"]
    imported = from_google_variables(tensors, CONFIG)
    model = imported.model().eval()
    optimizer, scheduler = bertopt.create_optimizer(model, settings["init_lr"], settings["num_train_steps"],
                                                    settings["num_warmup_steps"])
    imported.load_optimizer(optimizer, scheduler)
    objective = MlmNspObjective(model)
    history = []
    for i in range(steps):
        lr = optimizer.param_groups[0]["lr"]
        loss = google_losses(objective(**features_to_tensors(batch(f"step{i}"))))[2]
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        history.append((float(loss.detach()), lr, float(optimizer.last_grad_norm)))
    return history, model, optimizer


def test_continuation_equals_tensorflows(tensors):
    steps = META["continuation"]
    history, model, optimizer = continue_run(tensors, len(steps))
    for (loss, lr, norm), step in zip(history, steps):
        assert lr == pytest.approx(step["learning_rate"], rel=1e-6, abs=0)
        assert loss == pytest.approx(step["total_loss"], rel=2e-6, abs=0)
        assert norm == pytest.approx(step["grad_norm"], rel=1e-5, abs=0)  # clipped: all three are above 1
    ours = google_variables(model, optimizer.state_dict(), int(optimizer.state_dict()["state"][0]["step"]))
    assert int(ours["global_step"]) == META["final_global_step"]
    worst = {}
    for key in RECORDED.files:
        if key.startswith("final/"):
            name = key[len("final/"):]
            diff = np.abs(ours[name] - RECORDED[key])
            kind = name.rsplit("/", 1)[-1] if name.endswith(("adam_m", "adam_v")) else "weights"
            worst[kind] = max(worst.get(kind, 0.0), float(diff.max()))
            # The moments' own scale: adam_m up to 0.076, adam_v up to 1.7e-4 (measured 7.5e-9 and 2.9e-11 apart).
            scale = {"weights": 1e-5, "adam_m": 1e-7, "adam_v": 1e-9}[kind]
            assert diff.max() <= scale, (name, float(diff.max()))
    assert set(worst) == {"weights", "adam_m", "adam_v"}
    print("max abs difference after", len(steps), "steps:", worst)


def test_weights_only_without_slots(tensors):
    weights = {k: v for k, v in tensors.items() if not k.endswith(("adam_m", "adam_v"))}
    imported = from_google_variables(weights, CONFIG)
    assert imported.slots is None and imported.global_step == 5
    assert any("weights only" in note and "global_step 5" in note for note in imported.notes)
    model = imported.model()
    optimizer, scheduler = bertopt.create_optimizer(model, 5e-3, 10, 3)
    imported.load_optimizer(optimizer, scheduler)
    assert optimizer.state_dict()["state"] == {} and scheduler.last_epoch == 5
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-3 * (1 - 5 / 10))


def test_config_mismatch_names_the_first_variable(tensors):
    config = json.loads(CONFIG.read_text())
    with pytest.raises(UsageError, match=r"variable bert/embeddings/word_embeddings has shape \[100, 16\], "
                                         r"bert_config says vocab_size 100, hidden_size 32: expected \[100, 32\]"):
        from_google_variables(tensors, dict(config, hidden_size=32, num_attention_heads=4))
    with pytest.raises(UsageError, match=r"no variable bert/encoder/layer_2/"):
        from_google_variables(tensors, dict(config, num_hidden_layers=3))
    with pytest.raises(UsageError, match=r"hidden_act 'swish'"):
        from_google_variables(tensors, dict(config, hidden_act="swish"))


def test_export_gives_back_googles_variables_bit_for_bit(tensors, tmp_path):
    imported = from_google_variables(tensors, CONFIG)
    model = imported.model()
    optimizer, _ = bertopt.create_optimizer(model, 5e-3, 10, 3)
    imported.load_optimizer(optimizer)
    exported = google_variables(model, optimizer.state_dict(), imported.global_step)
    assert exported.keys() == tensors.keys()
    for name, value in tensors.items():
        assert exported[name].dtype == value.dtype and np.array_equal(exported[name], value), name
    export_tf_checkpoint(model, optimizer.state_dict(), imported.global_step, tmp_path / "model.ckpt-5")
    again = read_tf_checkpoint(tmp_path / "model.ckpt-5")
    assert again.keys() == tensors.keys() and all(np.array_equal(again[k], tensors[k]) for k in tensors)


def test_import_tf_checkpoint_writes_a_model_directory(tmp_path):
    imported = import_tf_checkpoint(CKPT, CONFIG, HERE / "vocab.txt", tmp_path)
    assert imported.global_step == 5 and imported.slots is not None
    assert "casing guessed from the vocabulary: do_lower_case=True" in imported.notes
    model = transformers.BertForPreTraining.from_pretrained(tmp_path / "model").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "model")
    assert tokenizer("W01 w02")["input_ids"] == [2, 6, 7, 3]  # lower-cased, [CLS] ... [SEP]
    f = features_to_tensors(batch("eval"))
    with torch.no_grad():
        terms = MlmNspObjective(model)(**f)
    assert float(google_losses(terms)[2]) == pytest.approx(float(RECORDED["eval/total_loss"]), rel=1e-6)


def _log_probs(model, f, attention_adder=None):
    """(masked-LM log-probs at the weighted slots, NSP log-probs) of ``model`` on features ``f``;
    ``attention_adder``: run the encoder layer by layer with Google's additive mask constant."""
    objective = MlmNspObjective(model, shortcut=False)
    with torch.no_grad():
        if attention_adder is None:
            terms = objective(**f)
            return terms.masked_lm_log_probs.numpy(), terms.next_sentence_log_probs.numpy()
        hidden = model.bert.embeddings(input_ids=f["input_ids"], token_type_ids=f["segment_ids"])
        additive = (1.0 - f["input_mask"][:, None, None, :].float()) * attention_adder
        for layer in model.bert.encoder.layer:
            out = layer(hidden, attention_mask=additive)
            hidden = out[0] if isinstance(out, tuple) else out
        rows, slots = torch.nonzero(f["masked_lm_weights"], as_tuple=True)
        mlm = model.cls.predictions(hidden[rows, f["masked_lm_positions"][rows, slots].long()])
        nsp = model.cls.seq_relationship(model.bert.pooler(hidden))
        return torch.log_softmax(mlm, -1).numpy(), torch.log_softmax(nsp, -1).numpy()


def test_what_differs_from_a_transformers_bert(tensors):
    """The effect on the log-probs of each convention the importer takes care of, when it is not
    (docs/google-checkpoints.md quotes these numbers)."""
    f = features_to_tensors(batch("eval"))
    slots = RECORDED["eval/masked_lm_weights"].reshape(-1) != 0
    google = RECORDED["eval/masked_lm_log_probs"][slots], RECORDED["eval/next_sentence_log_probs"]

    def effect(model, **kw):
        mlm, nsp = _log_probs(model.eval(), f, **kw)
        return max(float(np.abs(mlm - google[0]).max()), float(np.abs(nsp - google[1]).max()))

    imported = from_google_variables(tensors, CONFIG)
    effects = {"imported": effect(imported.model())}
    effects["erf GELU (transformers' gelu)"] = effect(from_google_variables(tensors, CONFIG, gelu="erf").model())
    imported.config.hidden_act = "gelu_new"
    effects["transformers' gelu_new (the tanh formula in separate ops)"] = effect(imported.model())
    imported.config.hidden_act = "gelu_pytorch_tanh"
    imported.config.layer_norm_eps = 1e-5
    effects["LayerNorm eps 1e-5 (torch's default)"] = effect(imported.model())
    imported.config.layer_norm_eps = 1e-12
    effects["attention mask -10000 (Google's) in eager attention"] = effect(imported.model(), attention_adder=-10000.0)
    effects["token_type_ids not passed"] = max(
        float(np.abs(a - b).max()) for a, b in zip(_log_probs(imported.model().eval(), dict(
            f, segment_ids=torch.zeros_like(f["segment_ids"]))), google))
    without_bias = imported.model()
    with torch.no_grad():
        without_bias.cls.predictions.bias.zero_()
    effects["masked-LM output_bias left out"] = effect(without_bias)
    print({k: f"{v:.2g}" for k, v in effects.items()})
    assert effects["imported"] < 1e-5
    assert effects["transformers' gelu_new (the tanh formula in separate ops)"] < 1e-5
    assert effects["attention mask -10000 (Google's) in eager attention"] < 1e-5  # exp(-10000) is 0 in float32
    assert effects["erf GELU (transformers' gelu)"] > 1e-4  # what hidden_act "gelu" would cost
    assert effects["LayerNorm eps 1e-5 (torch's default)"] > 1e-5
    assert effects["token_type_ids not passed"] > 1e-2 and effects["masked-LM output_bias left out"] > 1e-2


def test_import_tf_then_export_tf_commands_give_back_the_checkpoint(tmp_path, capsys):
    from bertopt.cli import main

    assert main(["import-tf", str(CKPT) + ".index", "--bert-config", str(CONFIG), "--vocab", str(HERE / "vocab.txt"),
                 "--out", str(tmp_path / "run")]) == 0
    assert "global_step 5, Adam slots imported" in capsys.readouterr().out
    assert main(["export-tf", str(tmp_path / "run"), "--out", str(tmp_path / "back" / "model.ckpt-5")]) == 0
    back, original = read_tf_checkpoint(tmp_path / "back" / "model.ckpt-5"), read_tf_checkpoint(CKPT)
    assert back.keys() == original.keys() and all(np.array_equal(back[k], original[k]) for k in original)
    # the same from Python: bertopt.export_tf(RUN_DIR, CKPT)
    exported = bertopt.export_tf(tmp_path / "run", tmp_path / "api" / "model.ckpt-5")
    assert exported["global_step"] == 5 and exported["slots"] and exported["left_out"] == []
    again = read_tf_checkpoint(tmp_path / "api" / "model.ckpt-5")
    assert again.keys() == original.keys() and all(np.array_equal(again[k], original[k]) for k in original)

    config = json.loads(CONFIG.read_text())
    (tmp_path / "wide.json").write_text(json.dumps(dict(config, intermediate_size=64)))
    assert main(["import-tf", str(CKPT), "--bert-config", str(tmp_path / "wide.json"), "--vocab",
                 str(HERE / "vocab.txt"), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "variable bert/encoder/layer_0/intermediate/dense/kernel has shape [16, 32]" in err
    assert "intermediate_size 64" in err and "Traceback" not in err and not (tmp_path / "bad" / "model").exists()


def test_vocabulary_that_does_not_fit_is_refused(tmp_path):
    words = (HERE / "vocab.txt").read_text().splitlines()
    cases = {"short.txt": (words[:-1], "has 99 tokens but bert_config.json says vocab_size 100"),
             "nomask.txt": ([w if w != "[MASK]" else "w99" for w in words], r"lacks \['\[MASK\]'\]"),
             "twice.txt": (words[:-1] + ["w00"], "lists 'w00' twice")}
    for name, (tokens, message) in cases.items():
        (tmp_path / name).write_text("\n".join(tokens) + "\n")
        with pytest.raises(UsageError, match=message):
            import_tf_checkpoint(CKPT, CONFIG, tmp_path / name, tmp_path / name.replace(".txt", ""))
        assert not (tmp_path / name.replace(".txt", "") / "model").exists()


def test_slots_load_into_lamb_too(tensors):
    """bertopt's Lamb keeps Adam's state names: Google's moments and step load into it as well."""
    imported = from_google_variables(tensors, CONFIG)
    model = imported.model()
    optimizer, scheduler = bertopt.create_optimizer(model, 5e-3, 10, 3, optimizer="lamb")
    imported.load_optimizer(optimizer, scheduler)
    state = optimizer.state[model.bert.encoder.layer[1].intermediate.dense.weight]
    expected = tensors["bert/encoder/layer_1/intermediate/dense/kernel/adam_v"].T
    assert np.array_equal(state["exp_avg_sq"].numpy(), expected) and float(state["step"]) == 5.0
    assert scheduler.last_epoch == 5


def test_checkpoint_without_the_heads_gets_them_initialised(tensors):
    """An encoder-only checkpoint (no cls/ variables, e.g. from fine-tuning): the heads are new,
    said in the notes, and the encoder's moments still load (the heads' start at zero)."""
    encoder = {k: v for k, v in tensors.items() if not k.startswith("cls/")}
    imported = from_google_variables(encoder, CONFIG)
    assert any("head variables are not in the checkpoint" in note for note in imported.notes)
    model = imported.model()
    assert np.array_equal(model.cls.predictions.decoder.weight.detach().numpy(), tensors["bert/embeddings/word_embeddings"])
    optimizer, scheduler = bertopt.create_optimizer(model, 5e-3, 10, 3)
    imported.load_optimizer(optimizer, scheduler)
    assert model.bert.pooler.dense.weight in optimizer.state and model.cls.seq_relationship.weight not in optimizer.state


def test_export_tf_leaves_out_heads_the_model_directory_lacks(tmp_path, capsys):
    """A run directory holding a BertForMaskedLM (no pooler, no next-sentence head): loading it as
    BertForPreTraining initialises those at random, which export-tf must not write as if trained."""
    from bertopt.cli import main

    imported = from_google_variables(read_tf_checkpoint(CKPT), CONFIG)
    masked_lm = transformers.BertForMaskedLM(imported.config)
    masked_lm.load_state_dict(imported.model().state_dict(), strict=False)
    masked_lm.save_pretrained(tmp_path / "run" / "model")
    assert main(["export-tf", str(tmp_path / "run"), "--out", str(tmp_path / "out" / "model.ckpt")]) == 0
    assert "left out of the checkpoint" in capsys.readouterr().out
    exported, original = read_tf_checkpoint(tmp_path / "out" / "model.ckpt"), read_tf_checkpoint(CKPT)
    lacking = {"bert/pooler/dense/kernel", "bert/pooler/dense/bias", "cls/seq_relationship/output_weights",
               "cls/seq_relationship/output_bias"}
    weights = {k for k in original if not k.endswith(("adam_m", "adam_v")) and k != "global_step"}
    assert set(exported) == weights - lacking
    assert all(np.array_equal(exported[k], original[k]) for k in exported)


def test_export_tf_after_importing_a_checkpoint_without_heads(tmp_path):
    """Adam slots for the encoder only (the cls/ heads were initialised at import): the heads' moments
    are Adam's zeros, the rest as imported."""
    from bertopt.cli import main

    original = read_tf_checkpoint(CKPT)
    write_tf_checkpoint(tmp_path / "encoder" / "model.ckpt-5", {k: v for k, v in original.items()
                                                                 if not k.startswith("cls/")})
    assert main(["import-tf", str(tmp_path / "encoder" / "model.ckpt-5"), "--bert-config", str(CONFIG), "--vocab",
                 str(HERE / "vocab.txt"), "--out", str(tmp_path / "run")]) == 0
    assert main(["export-tf", str(tmp_path / "run"), "--out", str(tmp_path / "back" / "model.ckpt-5")]) == 0
    back = read_tf_checkpoint(tmp_path / "back" / "model.ckpt-5")
    assert back.keys() == original.keys()
    for name, value in back.items():
        if name.startswith("cls/") and name.endswith(("adam_m", "adam_v")):
            assert value.shape == original[name].shape and not value.any(), name
        elif not name.startswith("cls/"):
            assert np.array_equal(value, original[name]), name


def test_google_variables_refuses_an_optimizer_state_of_another_model(tensors):
    imported = from_google_variables(tensors, CONFIG)
    model = imported.model()
    optimizer, _ = bertopt.create_optimizer(model, 5e-3, 10, 3)
    imported.load_optimizer(optimizer)
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        group["param_names"] = ["module." + n for n in group["param_names"]]  # e.g. a DDP wrapper's names
    with pytest.raises(ValueError, match="no parameter named bert.embeddings.word_embeddings.weight"):
        google_variables(model, state, 5)


def test_import_interrupted_while_writing_leaves_no_model_directory(tmp_path, monkeypatch):
    """The model directory is written beside and renamed into place: a failure while writing it
    (here the tokenizer, written last) leaves none, so the same import-tf can simply run again."""
    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.BertTokenizerFast, "save_pretrained", fail)
    with pytest.raises(OSError):
        import_tf_checkpoint(CKPT, CONFIG, HERE / "vocab.txt", tmp_path / "run")
    assert not (tmp_path / "run" / "model").exists()
    monkeypatch.undo()
    import_tf_checkpoint(CKPT, CONFIG, HERE / "vocab.txt", tmp_path / "run")
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_export_tf_refuses_a_model_directory_that_is_not_a_bert(tmp_path, capsys):
    from bertopt.cli import main

    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "run" / "model")
    assert main(["export-tf", str(tmp_path / "run"), "--out", str(tmp_path / "out" / "model.ckpt")]) == 2
    assert "is not a BERT model directory: it has no bert.embeddings" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_tf_refuses_imported_slots_once_the_model_changed(tmp_path, capsys):
    """google_optimizer.pt holds the moments and step of the weights import-tf wrote: a model/ replaced
    since must not be exported with them. (With the run's checkpoints, export-tf exports the newest
    checkpoint instead, weights and moments together: tests/train/test_pretrain_google_continuation.py;
    here they are removed, as in a run directory of an earlier import-tf.)"""
    import shutil

    from bertopt.cli import main

    assert main(["import-tf", str(CKPT), "--bert-config", str(CONFIG), "--vocab", str(HERE / "vocab.txt"),
                 "--out", str(tmp_path / "run")]) == 0
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    model = transformers.BertForPreTraining.from_pretrained(tmp_path / "run" / "model")
    with torch.no_grad():
        model.bert.pooler.dense.bias.add_(1.0)
    model.save_pretrained(tmp_path / "run" / "model")
    capsys.readouterr()
    assert main(["export-tf", str(tmp_path / "run"), "--out", str(tmp_path / "out" / "model.ckpt")]) == 2
    assert "is not the model that import-tf wrote" in capsys.readouterr().err
    (tmp_path / "run" / "google_optimizer.pt").unlink()
    assert main(["export-tf", str(tmp_path / "run"), "--out", str(tmp_path / "out" / "model.ckpt")]) == 0
    exported = read_tf_checkpoint(tmp_path / "out" / "model.ckpt")
    assert "global_step" not in exported and not any(k.endswith("adam_m") for k in exported)


def test_export_refuses_an_untied_decoder(tensors):
    imported = from_google_variables(tensors, CONFIG)
    imported.config.tie_word_embeddings = False
    model = imported.model()
    with torch.no_grad():
        model.cls.predictions.decoder.weight.add_(0.5)
    assert model.cls.predictions.decoder.weight is not model.bert.embeddings.word_embeddings.weight
    with pytest.raises(ValueError, match="cls.predictions.decoder.weight differs from its "
                                         "bert.embeddings.word_embeddings.weight"):
        google_variables(model)
