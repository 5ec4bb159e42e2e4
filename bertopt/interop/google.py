"""Google's BERT checkpoints <-> transformers' ``BertForPreTraining`` and bertopt's optimizer state.

A checkpoint written by google-research/bert (``run_pretraining.py``: ``tf.train.Saver``) holds
the model's variables under Google's names, the Adam slots ``<variable>/adam_m`` and
``<variable>/adam_v`` of ``AdamWeightDecayOptimizer`` and ``global_step``. Read with
:func:`bertopt.interop.tf_checkpoint.read_tf_checkpoint` (a dict of numpy arrays, no TensorFlow),
:func:`from_google_variables` turns it into a ``BertConfig``, a ``BertForPreTraining`` state dict
and the optimizer state of BertAdam (``exp_avg``, ``exp_avg_sq``: the same moments, the same
update, see ``tests/interop/test_google_model.py``), and :func:`google_variables` goes back.

Names and layouts (``L`` a layer index)::

    bert/embeddings/{word,position,token_type}_embeddings   bert.embeddings.*_embeddings.weight
    .../LayerNorm/gamma, beta                                .../LayerNorm.weight, bias
    bert/encoder/layer_L/attention/self/{query,key,value}    bert.encoder.layer.L.attention.self.*
    bert/encoder/layer_L/{attention/output,intermediate,output}/dense, bert/pooler/dense,
    cls/predictions/transform/dense: kernel [in, out]        .weight [out, in] (transposed), .bias
    cls/predictions/output_bias                              cls.predictions.bias (= decoder.bias)
    cls/seq_relationship/output_weights [2, H]               cls.seq_relationship.weight (as is)
    cls/seq_relationship/output_bias                         cls.seq_relationship.bias

The masked-LM decoder is the word embedding matrix in both (tied). Slots get the variable's
transpose. ``global_step`` is BertAdam's ``step`` and the schedule's ``last_epoch``: Google's
update ``k`` uses LR(k) and leaves ``global_step = k + 1``, as bertopt's scheduler after ``k + 1``
``scheduler.step()`` calls.

Google's current ``modeling.py`` computes GELU with the tanh approximation (transformers'
``gelu_pytorch_tanh``); the code of the first released checkpoints (2018) used erf (transformers' ``gelu``).
``gelu="tanh"`` (default) matches the code that continues a run today; ``gelu="erf"`` matches the
published BERT-Base/Large weights as transformers has always loaded them. See
docs/google-checkpoints.md for this and the other differences, measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from bertopt.errors import UsageError

SLOT_SUFFIXES = {"adam_m": "exp_avg", "adam_v": "exp_avg_sq"}
GLOBAL_STEP = "global_step"
# Google's gelu -> transformers' hidden_act. gelu_pytorch_tanh is torch's fused kernel of Google's tanh
# formula (gelu_new, the same formula in separate ops, agrees as closely: tests/interop/test_google_model.py).
GELU_FORMS = {"tanh": "gelu_pytorch_tanh", "erf": "gelu"}
# Keys of Google's bert_config.json (modeling.BertConfig); BertConfig takes them under the same names.
CONFIG_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
               "type_vocab_size", "initializer_range")
CONTRIB_LAYER_NORM_EPSILON = 1e-12  # tf.contrib.layers.layer_norm's fixed variance_epsilon


@dataclass(frozen=True)
class Variable:
    """One of Google's variables and its place in ``BertForPreTraining``."""
    google: str
    torch: str
    dims: tuple[str, ...]  # the bert_config.json field giving each dimension of Google's shape
    transposed: bool = False  # Google's dense kernel [in, out] is torch's Linear weight [out, in]
    tied: tuple[str, ...] = ()  # other state-dict names of the same tensor


def variable_table(config: Mapping[str, Any]) -> list[Variable]:
    """Every variable of a Google BERT pretraining checkpoint for ``config`` (bert_config.json)."""
    table = [
        Variable("bert/embeddings/word_embeddings", "bert.embeddings.word_embeddings.weight",
                 ("vocab_size", "hidden_size"), tied=("cls.predictions.decoder.weight",)),
        Variable("bert/embeddings/position_embeddings", "bert.embeddings.position_embeddings.weight",
                 ("max_position_embeddings", "hidden_size")),
        Variable("bert/embeddings/token_type_embeddings", "bert.embeddings.token_type_embeddings.weight",
                 ("type_vocab_size", "hidden_size")),
        *_layer_norm("bert/embeddings/LayerNorm", "bert.embeddings.LayerNorm"),
    ]
    for i in range(int(config["num_hidden_layers"])):
        g, t = f"bert/encoder/layer_{i}", f"bert.encoder.layer.{i}"
        for part in ("query", "key", "value"):
            table += _dense(f"{g}/attention/self/{part}", f"{t}.attention.self.{part}", "hidden_size", "hidden_size")
        table += _dense(f"{g}/attention/output/dense", f"{t}.attention.output.dense", "hidden_size", "hidden_size")
        table += _layer_norm(f"{g}/attention/output/LayerNorm", f"{t}.attention.output.LayerNorm")
        table += _dense(f"{g}/intermediate/dense", f"{t}.intermediate.dense", "hidden_size", "intermediate_size")
        table += _dense(f"{g}/output/dense", f"{t}.output.dense", "intermediate_size", "hidden_size")
        table += _layer_norm(f"{g}/output/LayerNorm", f"{t}.output.LayerNorm")
    table += [
        *_dense("bert/pooler/dense", "bert.pooler.dense", "hidden_size", "hidden_size"),
        *_dense("cls/predictions/transform/dense", "cls.predictions.transform.dense", "hidden_size", "hidden_size"),
        *_layer_norm("cls/predictions/transform/LayerNorm", "cls.predictions.transform.LayerNorm"),
        Variable("cls/predictions/output_bias", "cls.predictions.bias", ("vocab_size",),
                 tied=("cls.predictions.decoder.bias",)),
        Variable("cls/seq_relationship/output_weights", "cls.seq_relationship.weight", ("2", "hidden_size")),
        Variable("cls/seq_relationship/output_bias", "cls.seq_relationship.bias", ("2",)),
    ]
    return table


def _dense(google: str, torch_name: str, fan_in: str, fan_out: str) -> list[Variable]:
    return [Variable(f"{google}/kernel", f"{torch_name}.weight", (fan_in, fan_out), transposed=True),
            Variable(f"{google}/bias", f"{torch_name}.bias", (fan_out,))]


def _layer_norm(google: str, torch_name: str) -> list[Variable]:
    return [Variable(f"{google}/gamma", f"{torch_name}.weight", ("hidden_size",)),
            Variable(f"{google}/beta", f"{torch_name}.bias", ("hidden_size",))]


def _expected_shape(variable: Variable, config: Mapping[str, Any]) -> tuple[int, ...]:
    return tuple(int(d) if d.isdigit() else int(config[d]) for d in variable.dims)


def _to_torch_layout(array: np.ndarray, variable: Variable) -> torch.Tensor:
    array = np.asarray(array, dtype=np.float32)  # a copy below: the reader's arrays may be read-only memory maps
    return torch.from_numpy(np.array(array.T if variable.transposed else array, order="C", copy=True))


def _to_google_layout(tensor: torch.Tensor, variable: Variable) -> np.ndarray:
    array = tensor.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(array.T if variable.transposed else array)


# --- bert_config.json -------------------------------------------------------------------------


def read_bert_config(path_or_dict) -> dict[str, Any]:
    """Google's bert_config.json as a dict, checked: every key modeling.BertConfig reads, positive
    sizes, heads dividing the width; a UsageError saying what is wrong otherwise."""
    if isinstance(path_or_dict, Mapping):
        config, where = dict(path_or_dict), "bert_config"
    else:
        where = str(path_or_dict)
        try:
            config = json.loads(Path(path_or_dict).read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read the BERT config {where}: {e}. Give the bert_config.json that came with "
                             "the checkpoint (a JSON object with vocab_size, hidden_size, num_hidden_layers, ...)") from e
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise UsageError(f"{where} lacks {missing}: a Google bert_config.json has all of {list(CONFIG_KEYS)}. "
                         "Give the config file released with the checkpoint")
    sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings", "type_vocab_size")
    bad = [k for k in sizes if not (isinstance(config[k], int) and config[k] > 0)]
    if bad:
        raise UsageError(f"{where}: {bad[0]} is {config[bad[0]]!r}; it must be a positive integer")
    if config["hidden_size"] % config["num_attention_heads"]:
        raise UsageError(f"{where}: hidden_size {config['hidden_size']} is not a multiple of num_attention_heads "
                         f"{config['num_attention_heads']}, which Google's modeling.py requires; check the file")
    return config


def bert_config_from_google(config: Mapping[str, Any], *, gelu: str = "tanh"):
    """transformers' ``BertConfig`` computing what Google's modeling.py computes with ``config``:
    its GELU form (``gelu``: "tanh" for today's modeling.py, "erf" for the 2018 code), LayerNorm
    epsilon 1e-12 (contrib's), absolute positions."""
    from transformers import BertConfig

    config = read_bert_config(config)
    if gelu not in GELU_FORMS:
        raise UsageError(f"gelu must be one of {sorted(GELU_FORMS)} (tanh: google-research/bert's modeling.py since "
                         f"2019; erf: the 2018 code of the first released checkpoints), got {gelu!r}")
    act = str(config["hidden_act"]).lower()
    hidden_act = {"gelu": GELU_FORMS[gelu], "relu": "relu", "tanh": "tanh", "linear": "linear"}.get(act)
    if hidden_act is None:
        raise UsageError(f"hidden_act {config['hidden_act']!r} is not one of Google's modeling.get_activation "
                         "(gelu, relu, tanh, linear); check bert_config.json")
    fields = {k: config[k] for k in CONFIG_KEYS}
    fields["hidden_act"] = hidden_act
    return BertConfig(**fields, layer_norm_eps=CONTRIB_LAYER_NORM_EPSILON, position_embedding_type="absolute")


# --- Google -> torch --------------------------------------------------------------------------


@dataclass
class GoogleCheckpoint:
    """A Google BERT checkpoint in transformers' and bertopt's terms (:func:`from_google_variables`)."""
    config: Any  # transformers.BertConfig
    state_dict: dict[str, torch.Tensor]  # BertForPreTraining's, tied names included
    slots: dict[str, dict[str, torch.Tensor]] | None  # torch name -> {"exp_avg", "exp_avg_sq"}; None: no slots
    global_step: int | None
    notes: list[str] = field(default_factory=list)  # what was not imported as is, in words

    def model(self):
        """A ``BertForPreTraining`` holding the weights."""
        from transformers import BertForPreTraining

        model = BertForPreTraining(self.config)
        model.load_state_dict(self.state_dict, strict=True)
        return model

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` with Google's moments and step for every parameter, for
        ``optimizer.load_state_dict``. The optimizer's param groups must carry ``param_names``
        (as :func:`bertopt.param_groups` / :func:`bertopt.create_optimizer` build them). Without
        slots in the checkpoint (weights only), the state is left empty: Adam starts from zero
        moments (``notes`` says so); so do heads the checkpoint lacked."""
        state_dict = optimizer.state_dict()
        if self.slots is None:
            return state_dict
        step = torch.tensor(float(self.global_step or 0), dtype=torch.float32)
        state = {}
        for index, name in _indices_and_names(state_dict):
            if name in self.slots:
                state[index] = {"step": step.clone(), **{k: v.clone() for k, v in self.slots[name].items()}}
            elif name not in self.state_dict:
                raise ValueError(f"parameter {name} is not part of the imported BertForPreTraining; build the "
                                 "optimizer on the model of this checkpoint (GoogleCheckpoint.model())")
            # else: a head the checkpoint lacked (initialised afresh): its moments start at zero
        return {**state_dict, "state": state}

    def load_optimizer(self, optimizer: torch.optim.Optimizer, scheduler=None) -> None:
        """Load :meth:`optimizer_state` into ``optimizer`` and set ``scheduler`` (a bertopt
        ScheduledLR, or any LRScheduler with a closed form) at ``global_step``: the next update
        uses the LR Google's run would use at that step."""
        optimizer.load_state_dict(self.optimizer_state(optimizer))
        if scheduler is not None and self.global_step is not None:
            set_schedule_step(scheduler, self.global_step)


def set_schedule_step(scheduler, step: int) -> None:
    """Put ``scheduler`` where it is after ``step`` calls of ``scheduler.step()``: ``last_epoch =
    step`` and every group's LR that of step ``step``."""
    scheduler.last_epoch = int(step)
    scheduler._step_count = int(step) + 1
    lrs = scheduler._get_closed_form_lr() if hasattr(scheduler, "_get_closed_form_lr") else scheduler.get_lr()
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)


def from_google_variables(tensors: Mapping[str, np.ndarray], bert_config, *, gelu: str = "tanh") -> GoogleCheckpoint:
    """A Google BERT checkpoint's variables (``read_tf_checkpoint``'s dict) and its bert_config.json
    (path or dict) as a :class:`GoogleCheckpoint`. Every variable is checked against the config: the
    first whose shape does not fit is a UsageError naming it, its shape and the config's numbers.
    A checkpoint without the ``cls/`` heads (e.g. a fine-tuned encoder) gets them initialised as
    transformers initialises them; without Adam slots, weights only: both are said in ``notes``."""
    raw = read_bert_config(bert_config)
    config = bert_config_from_google(raw, gelu=gelu)
    where = bert_config if not isinstance(bert_config, Mapping) else "bert_config"
    table = variable_table(raw)
    notes: list[str] = []
    missing = [v.google for v in table if v.google not in tensors]
    missing_encoder = [name for name in missing if not name.startswith("cls/")]
    if missing_encoder:
        raise UsageError(
            f"the checkpoint has no variable {missing_encoder[0]} ({len(missing_encoder)} of the {len(table)} variables "
            f"{where} implies are missing). Is it a Google BERT checkpoint (variables under bert/ and cls/), and is "
            f"num_hidden_layers {raw['num_hidden_layers']} right? List its variables with bertopt.read_tf_checkpoint")
    for variable in table:
        if variable.google not in tensors:
            continue
        shape, expected = tuple(np.shape(tensors[variable.google])), _expected_shape(variable, raw)
        if shape != expected:
            said = ", ".join(f"{d} {raw[d]}" for d in dict.fromkeys(variable.dims) if not d.isdigit())
            raise UsageError(
                f"variable {variable.google} has shape {list(shape)}, {where} says {said}: expected "
                f"{list(expected)}. The checkpoint and the config do not belong together: give the "
                "bert_config.json released with this checkpoint")

    from transformers import BertForPreTraining

    state_dict = BertForPreTraining(config).state_dict() if missing else {}
    if missing:
        notes.append(f"{len(missing)} head variables are not in the checkpoint ({', '.join(missing)}): initialised "
                     "as transformers initialises BertForPreTraining")
    for variable in table:
        if variable.google in tensors:
            value = _to_torch_layout(tensors[variable.google], variable)
            for name in (variable.torch, *variable.tied):
                state_dict[name] = value

    slots = _slots(tensors, table)
    if slots is None:
        notes.append("the checkpoint has no Adam slots (adam_m/adam_v): weights only, the optimizer starts from zero "
                     "moments" + (f" and the schedule at global_step {int(tensors[GLOBAL_STEP])}" if GLOBAL_STEP in tensors
                                  else ""))
    global_step = int(np.asarray(tensors[GLOBAL_STEP])) if GLOBAL_STEP in tensors else None
    if global_step is None:
        notes.append("the checkpoint has no global_step: the schedule starts at step 0")
    known = {v.google for v in table} | {f"{v.google}/{s}" for v in table for s in SLOT_SUFFIXES} | {GLOBAL_STEP}
    extra = sorted(set(tensors) - known)
    if extra:
        notes.append(f"{len(extra)} variables are not part of BertForPreTraining and were left out: "
                     + ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else ""))
    return GoogleCheckpoint(config=config, state_dict=state_dict, slots=slots, global_step=global_step, notes=notes)


def _slots(tensors: Mapping[str, np.ndarray], table: list[Variable]):
    """torch name -> {exp_avg, exp_avg_sq} when every variable present has both slots, else None."""
    present = [v for v in table if v.google in tensors]
    have = [all(f"{v.google}/{s}" in tensors for s in SLOT_SUFFIXES) for v in present]
    if not any(have):
        return None
    if not all(have):
        lacking = next(v.google for v, ok in zip(present, have) if not ok)
        raise UsageError(f"the checkpoint has Adam slots for some variables but not for {lacking}: it is incomplete or "
                         "mixes runs. Use a checkpoint written by run_pretraining.py, or import weights only from one "
                         "without any adam_m/adam_v")
    return {v.torch: {torch_key: _to_torch_layout(tensors[f"{v.google}/{slot}"], v)
                      for slot, torch_key in SLOT_SUFFIXES.items()} for v in present}


# --- torch -> Google --------------------------------------------------------------------------


def google_variables(model, optimizer_state: Mapping[str, Any] | None = None,
                     global_step: int | None = None, *, leave_out=()) -> dict[str, np.ndarray]:
    """A ``BertForPreTraining`` (or anything with its ``bert``/``cls`` submodules and names) as
    Google's variables, float32 numpy arrays; with ``optimizer_state`` (a BertAdam or other Adam
    ``state_dict()`` whose param groups carry ``param_names``) also ``<variable>/adam_m`` and
    ``/adam_v`` (zeros for a parameter without state yet: Adam's moments before its first
    update); with ``global_step`` also ``global_step`` (int64), as run_pretraining.py saves.
    ``leave_out``: torch names of parameters the model does not really hold (initialised afresh
    when it was loaded), not written: Google's code initialises what a checkpoint lacks."""
    params = dict(model.state_dict())
    config = model.config
    table = [v for v in variable_table({"num_hidden_layers": config.num_hidden_layers})
             if v.torch not in leave_out]
    out: dict[str, np.ndarray] = {}
    for variable in table:
        if variable.torch not in params:
            raise ValueError(f"the model has no {variable.torch}: not a BertForPreTraining")
        for tied in variable.tied:  # Google has one variable for both: a second, different one would be lost
            if tied in params and not torch.equal(params[tied], params[variable.torch]):
                raise ValueError(f"the model's {tied} differs from its {variable.torch}; Google's BERT holds one "
                                 f"variable ({variable.google}) for both, so this model cannot be exported as it is "
                                 "(tie them, e.g. with tie_word_embeddings=True, before training)")
        out[variable.google] = _to_google_layout(params[variable.torch], variable)
    if optimizer_state is not None:
        by_name = _optimizer_state_by_name(optimizer_state)
        for variable in table:
            state = by_name.get(variable.torch)
            if state is None:
                raise ValueError(f"the optimizer state has no parameter named {variable.torch} (its param_names "
                                 f"begin {list(by_name)[:3]}): it is not the state of an optimizer over this model")
            for slot, torch_key in SLOT_SUFFIXES.items():
                moment = state.get(torch_key, torch.zeros_like(params[variable.torch], dtype=torch.float32))
                out[f"{variable.google}/{slot}"] = _to_google_layout(moment, variable)
    if global_step is not None:
        out[GLOBAL_STEP] = np.asarray(int(global_step), dtype=np.int64)
    return out


def _indices_and_names(optimizer_state: Mapping[str, Any]):
    """(state index, parameter name) of every parameter of an optimizer ``state_dict()``."""
    for group in optimizer_state["param_groups"]:
        names = group.get("param_names")
        if names is None:
            raise ValueError("the optimizer's param groups carry no param_names, so Google's slots cannot be matched "
                             "to parameters by name: build the optimizer with bertopt.param_groups or "
                             "bertopt.create_optimizer")
        yield from zip(group["params"], names)


def _optimizer_state_by_name(optimizer_state: Mapping[str, Any]) -> dict[str, dict]:
    return {name: optimizer_state["state"].get(index, {}) for index, name in _indices_and_names(optimizer_state)}


# --- files ------------------------------------------------------------------------------------


def import_tf_checkpoint(ckpt, bert_config_json, vocab_txt, out_dir, *, do_lower_case: bool | None = None,
                         gelu: str = "tanh") -> GoogleCheckpoint:
    """Read Google's checkpoint ``ckpt`` (the prefix, e.g. ``model.ckpt-100000``) with its
    bert_config.json and vocab.txt and write ``out_dir/model``: a transformers ``BertForPreTraining``
    directory with a WordPiece tokenizer of that vocabulary (``do_lower_case``: None guesses from
    the vocabulary, lower case unless it has upper-case words). Returns the
    :class:`GoogleCheckpoint` (optimizer slots, global step, notes) for the caller to checkpoint
    with its optimizer (:meth:`GoogleCheckpoint.load_optimizer`)."""
    from transformers import BertTokenizerFast

    from bertopt.interop.tf_checkpoint import read_tf_checkpoint
    from bertopt.train.checkpoint import export_atomically

    vocab = _read_vocab(vocab_txt)
    imported = from_google_variables(read_tf_checkpoint(ckpt), bert_config_json, gelu=gelu)
    if len(vocab) != imported.config.vocab_size:
        raise UsageError(f"{vocab_txt} has {len(vocab)} tokens but bert_config.json says vocab_size "
                         f"{imported.config.vocab_size}: give the vocab.txt released with the checkpoint")
    if do_lower_case is None:
        do_lower_case = not any(any(c.isupper() for c in t) for t in vocab if not (t.startswith("[") and t.endswith("]")))
        imported.notes.append(f"casing guessed from the vocabulary: do_lower_case={do_lower_case}")
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=do_lower_case,
                                  model_max_length=imported.config.max_position_embeddings)
    model = imported.model()

    def write(directory: Path) -> None:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    export_atomically(write, Path(out_dir) / "model")  # a crash leaves no half-written model directory
    return imported


def _read_vocab(vocab_txt) -> list[str]:
    try:
        tokens = Path(vocab_txt).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UsageError(f"cannot read the vocabulary {vocab_txt}: {e}. Give the vocab.txt released with the "
                         "checkpoint (one WordPiece token a line)") from e
    if len(set(tokens)) != len(tokens):
        twice = next(t for i, t in enumerate(tokens) if t in tokens[:i])
        raise UsageError(f"{vocab_txt} lists {twice!r} twice: token ids would be ambiguous. Give the vocab.txt "
                         "released with the checkpoint")
    missing = [t for t in ("[CLS]", "[SEP]", "[MASK]", "[UNK]", "[PAD]") if t not in tokens]
    if missing:
        raise UsageError(f"{vocab_txt} lacks {missing}: not a BERT WordPiece vocabulary. Give the vocab.txt released "
                         "with the checkpoint")
    return tokens


def export_tf_checkpoint(model, optimizer_state: Mapping[str, Any] | None, global_step: int | None, prefix, *,
                         leave_out=()) -> None:
    """Write ``model`` (a BertForPreTraining) with its BertAdam state and step as a TF checkpoint at
    ``prefix`` (``prefix.index`` + ``prefix.data-00000-of-00001``) that Google's
    ``run_pretraining.py --init_checkpoint`` and ``tf.train.load_checkpoint`` read
    (``leave_out``: as :func:`google_variables`)."""
    from bertopt.interop.tf_checkpoint import write_tf_checkpoint

    write_tf_checkpoint(prefix, google_variables(model, optimizer_state, global_step, leave_out=leave_out))
