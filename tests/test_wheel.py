"""The package as users get it: a wheel built from this tree ships the C sources, and
installed into a fresh environment it compiles them on first use and runs BertAdam and
Lamb on the native kernels (not torch's fallback)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from bertopt.optim.native import build

ROOT = Path(__file__).resolve().parents[1]
C_FILES = {"bertopt/optim/csrc/" + name for name in (*build.HEADERS, *build.SOURCES)}

IN_THE_FRESH_ENVIRONMENT = r"""
import sys, torch
import bertopt
from bertopt.optim.native import build, kernels
assert sys.argv[1] in bertopt.__file__, ("not the installed wheel", bertopt.__file__)
for cls in (bertopt.BertAdam, bertopt.Lamb):
    p = torch.nn.Parameter(torch.randn(1000, 100))
    p.grad = torch.randn(1000, 100)
    cls([p], lr=0.01, max_grad_norm=1.0).step()
print(build.status())
print(dict(kernels.calls))
"""


@pytest.mark.skipif(build.find_compiler() is None, reason="no C compiler")
def test_wheel_ships_the_c_sources_and_runs_the_native_kernels(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(dist), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(dist.glob("bertopt-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert C_FILES <= names, C_FILES - names

    # A fresh environment with this wheel; torch from the one running the tests (a .pth
    # line: the same torch build, nothing downloaded).
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "torch_from_test_env.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, timeout=300)

    env = {**os.environ, "BERTOPT_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": ""}
    env.pop("BERTOPT_NATIVE", None)
    out = subprocess.run([str(python), "-c", IN_THE_FRESH_ENVIRONMENT, str(site)], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    status, calls = out.stdout.strip().splitlines()[-2:]
    assert status.startswith(f"loaded {tmp_path / 'cache' / 'native'}"), status  # built here, from the wheel's sources
    calls = eval(calls)  # noqa: S307 - our own dict repr
    assert calls.get("adam") == 1 and calls.get("lamb_step") == 1 and calls.get("sumsq") == 2, calls
