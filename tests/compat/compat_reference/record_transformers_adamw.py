"""Record trajectories of transformers' removed ``AdamW`` (4.49.0) into a fixture.

transformers 4.50 removed ``transformers.AdamW``; bertopt's own venv has a newer
transformers, so this script runs in a separate venv with transformers 4.49.0 and the
same torch (see README.md here). ``tests/compat/test_compat_adamw.py`` replays the fixture with
``bertopt.compat.AdamW`` (torch only) and compares every parameter at every step.

The problem: float32 parameters with BERT-like names, loss at step k
``factor[k] * sum_i sum(c_i * sin(p_i) + 0.5 * d_i * p_i**2)`` (fixed random c, d and
per-step factors), so each step's gradient depends on the parameters: a wrong update
changes every later gradient. Scenarios cover ``correct_bias`` on and off, with and
without decay, per-group options and transformers' linear warmup schedule. For one
scenario the optimizer's state_dict is saved mid-run, to test loading it into the drop-in.

Before writing, the script checks that two runs agree bit for bit.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import warnings
from importlib import metadata
from pathlib import Path

import torch

FIXTURE_PATH = Path(__file__).with_name("transformers_adamw_trajectory.json")

VARIABLES = (
    ("encoder.layer.0.attention.self.query.weight", (8, 6)),
    ("encoder.layer.0.attention.self.query.bias", (6,)),
    ("encoder.layer.0.attention.output.LayerNorm.weight", (6,)),
    ("classifier.weight", (3, 6)),
)
DECAYED = (0, 3)  # the weights; bias and LayerNorm are the no-decay group where groups are used

SETTINGS = {"num_steps": 40, "seed": 20190611, "factor_range": [0.05, 2.0], "state_dict_at_step": 17}

# name -> optimizer defaults, per-group overrides (None: one group of all), schedule
SCENARIOS = {
    "bias_correction": dict(defaults=dict(lr=1e-2), groups=None, schedule=None),
    "bias_correction_decay": dict(defaults=dict(lr=1e-2, weight_decay=0.05), groups=None, schedule=None),
    "bert_no_bias_correction": dict(defaults=dict(lr=1e-2, weight_decay=0.05, correct_bias=False),
                                    groups=None, schedule=None),
    "no_bias_correction_no_decay": dict(defaults=dict(lr=1e-2, correct_bias=False), groups=None, schedule=None),
    "per_group": dict(
        defaults=dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.05, correct_bias=False),
        # decayed weights keep the defaults; the other group: no decay, bias correction, its own lr and eps
        groups=[{}, dict(weight_decay=0.0, correct_bias=True, lr=3e-2, eps=1e-6)],
        schedule=None,
    ),
    "warmup_linear_schedule": dict(
        defaults=dict(lr=2e-2, weight_decay=0.01, correct_bias=False),
        groups=[{}, dict(weight_decay=0.0)],
        schedule=dict(name="get_linear_schedule_with_warmup", num_warmup_steps=8, num_training_steps=36),
    ),
}
STATE_DICT_SCENARIO = "warmup_linear_schedule"


def make_problem(settings: dict) -> dict:
    gen = torch.Generator().manual_seed(settings["seed"])
    variables = []
    for name, shape in VARIABLES:
        initial = torch.rand(shape, generator=gen) * 2 - 1
        if "LayerNorm.weight" in name:
            initial = 1 + 0.2 * initial
        variables.append({
            "name": name, "shape": list(shape), "initial": initial.tolist(),
            "c": torch.randn(shape, generator=gen).tolist(),
            "d": (0.2 + 0.8 * torch.rand(shape, generator=gen)).tolist(),
        })
    low, high = settings["factor_range"]
    u = torch.rand(settings["num_steps"], generator=gen, dtype=torch.float64)
    factors = torch.exp(torch.log(torch.tensor(low)) + u * (torch.log(torch.tensor(high)) - torch.log(torch.tensor(low))))
    return {"variables": variables, "factors": factors.float().tolist()}


def tensors(problem: dict, key: str) -> list[torch.Tensor]:
    return [torch.tensor(v[key], dtype=torch.float32).reshape(v["shape"]) for v in problem["variables"]]


def loss_fn(params, c, d, factor):
    return factor * sum((ci * torch.sin(p) + 0.5 * di * p * p).sum() for p, ci, di in zip(params, c, d))


def param_groups(params, scenario):
    if scenario["groups"] is None:
        return [{"params": params}]
    decayed = [p for i, p in enumerate(params) if i in DECAYED]
    others = [p for i, p in enumerate(params) if i not in DECAYED]
    return [{"params": decayed, **scenario["groups"][0]}, {"params": others, **scenario["groups"][1]}]


def run(problem: dict, scenario: dict, num_steps: int, state_dict_at: int | None):
    from transformers import AdamW, get_linear_schedule_with_warmup

    params = [torch.nn.Parameter(t) for t in tensors(problem, "initial")]
    c, d = tensors(problem, "c"), tensors(problem, "d")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # its deprecation notice
        opt = AdamW(param_groups(params, scenario), **scenario["defaults"])
    sched = None
    if scenario["schedule"] is not None:
        s = scenario["schedule"]
        sched = get_linear_schedule_with_warmup(opt, s["num_warmup_steps"], s["num_training_steps"])
    steps, saved = [], None
    for k in range(num_steps):
        if k == state_dict_at:
            saved = state_dict_to_json(opt.state_dict(), sched)
        loss = loss_fn(params, c, d, problem["factors"][k])
        loss.backward()
        lrs = [g["lr"] for g in opt.param_groups]
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()
        steps.append({"lrs": lrs, "params": [p.detach().tolist() for p in params]})
    return steps, saved


def state_dict_to_json(sd: dict, sched) -> dict:
    state = {str(i): {"step": s["step"], "exp_avg": s["exp_avg"].tolist(), "exp_avg_sq": s["exp_avg_sq"].tolist()}
             for i, s in sd["state"].items()}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups, "scheduler_last_epoch": None if sched is None else sched.last_epoch}


def record(settings: dict) -> dict:
    problem = make_problem(settings)
    scenarios = {}
    for name, scenario in SCENARIOS.items():
        at = settings["state_dict_at_step"] if name == STATE_DICT_SCENARIO else None
        steps, saved = run(problem, scenario, settings["num_steps"], at)
        again, _ = run(problem, scenario, settings["num_steps"], at)
        if again != steps:
            raise SystemExit(f"{name}: two runs differ; the recording is not reproducible")
        scenarios[name] = {**{k: v for k, v in scenario.items()}, "steps": steps}
        if saved is not None:
            scenarios[name]["state_dict"] = {"at_step": at, **saved}
    return {
        "about": "transformers.AdamW (4.49.0) trajectories; see README.md and record_transformers_adamw.py",
        "loss": "factor[step] * sum_i sum(c_i * sin(p_i) + 0.5 * d_i * p_i**2)",
        "settings": settings,
        "decayed_group_indices": list(DECAYED),
        "problem": problem,
        "scenarios": scenarios,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": metadata.version("transformers"),
        },
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-only", action="store_true", help="record and check, do not write")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    fixture = record(SETTINGS)
    if metadata.version("transformers") != "4.49.0":
        print(f"warning: transformers {metadata.version('transformers')}, not 4.49.0", file=sys.stderr)
    if not args.check_only:
        FIXTURE_PATH.write_text(json.dumps(fixture, separators=(",", ":")) + "\n")
        print(f"wrote {FIXTURE_PATH} ({FIXTURE_PATH.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
