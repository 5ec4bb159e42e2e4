"""Record timm's Lamb trajectories for tests/optim/test_lamb_reference.py.

timm's top-level package imports torchvision, whose wheels pin a torch version; so this
script loads only ``timm/optim/{_types,_helpers,lamb}.py`` (they import nothing but
torch) from a timm wheel or an unpacked timm source tree:

    pip download timm --no-deps -d /tmp/timm
    python tests/optim/lamb_reference/record_timm_lamb.py /tmp/timm/timm-*.whl

Writes tests/optim/lamb_reference/timm_lamb_trajectory.json (float32 throughout).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import types
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from problem import LR, WEIGHT_DECAY, decayed, make_problem, to_lists  # noqa: E402

CONFIGS = {
    # name: timm Lamb keyword arguments (besides lr); groups: decayed wd 0.01, others 0
    "defaults": {},
    "trust_clip_always_adapt": {"trust_clip": True, "always_adapt": True},
    "no_bias_correction_no_clip": {"bias_correction": False, "max_grad_norm": None},
}


def load_timm_lamb(source: Path):
    """timm.optim.lamb from a wheel or a source tree, without importing timm/__init__."""
    if source.suffix == ".whl":
        root = Path(tempfile.mkdtemp())
        with zipfile.ZipFile(source) as z:
            for name in ("_types.py", "_helpers.py", "lamb.py"):
                z.extract(f"timm/optim/{name}", root)
        source = root
    optim_dir = source / "timm" / "optim"
    package = types.ModuleType("timm_optim")
    package.__path__ = [str(optim_dir)]
    sys.modules["timm_optim"] = package
    module = None
    for name in ("_types", "_helpers", "lamb"):
        spec = importlib.util.spec_from_file_location(f"timm_optim.{name}", optim_dir / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


def run(lamb_module, kwargs, init, grads):
    params = {n: torch.nn.Parameter(torch.from_numpy(a.copy())) for n, a in init.items()}
    groups = [
        {"params": [p for n, p in params.items() if decayed(n)], "weight_decay": WEIGHT_DECAY},
        {"params": [p for n, p in params.items() if not decayed(n)], "weight_decay": 0.0},
    ]
    opt = lamb_module.Lamb(groups, lr=LR, **kwargs)
    trajectory = []
    for g in grads:
        for n, p in params.items():
            p.grad = torch.from_numpy(g[n].copy())
        opt.step()
        trajectory.append(to_lists({n: p.detach().numpy() for n, p in params.items()}))
    return trajectory


def main():
    source = Path(sys.argv[1])
    lamb_module = load_timm_lamb(source)
    init, grads = make_problem()
    out = {
        "source": f"timm/optim/lamb.py from {source.name}, torch {torch.__version__}, float32",
        "command": "python tests/optim/lamb_reference/record_timm_lamb.py " + source.name,
        "lr": LR,
        "init": to_lists(init),
        "grads": [to_lists(g) for g in grads],
        "configs": {name: {"timm": kwargs, "trajectory": run(lamb_module, kwargs, init, grads)}
                    for name, kwargs in CONFIGS.items()},
    }
    path = Path(__file__).parent / "timm_lamb_trajectory.json"
    path.write_text(json.dumps(out))
    print("wrote", path)


if __name__ == "__main__":
    main()
