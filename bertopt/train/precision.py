"""Mixed precision for the training loop: autocast for forward/backward, fp32 everywhere else.

Weights, gradients and optimizer state stay float32 ("master weights"): only the operations that
autocast chooses run in the lower precision. bfloat16 has float32's exponent range, so it needs
no loss scaling; float16 does, and :class:`torch.amp.GradScaler` provides it: a step whose scaled
gradients overflowed is skipped (the optimizer is not called, so its step count does not move)
and the scale is lowered.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class MixedPrecision:
    name: str = "fp32"  # fp32 | bf16 | fp16
    device_type: str = "cpu"
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self) -> None:
        if self.name not in DTYPES:
            raise ValueError(f"--precision must be one of {', '.join(DTYPES)}; got {self.name!r}")
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=DTYPES[self.name])

    @classmethod
    def for_device(cls, name: str, device: torch.device) -> "MixedPrecision":
        """The precision ``name`` on ``device``, or ValueError when that device cannot train in it."""
        if name == "fp16" and device.type != "cuda":
            raise ValueError(
                "--precision fp16 needs a CUDA GPU: float16 autocast with loss scaling is a GPU recipe, and on "
                "a CPU it is slower than float32. Use --precision bf16 (fast on CPUs with AVX-512 bf16 or AMX) "
                "or fp32")
        if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"--precision bf16: this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16 "
                             "support; use --precision fp16 (with loss scaling) or fp32")
        return cls(name, device.type)


def cpu_has_bf16_units() -> bool | None:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX), from /proc/cpuinfo;
    None where that cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def precision_note(name: str, device: torch.device) -> str | None:
    """A warning worth printing before a run: bf16 on a CPU without bfloat16 units is emulated.
    Measured on an AVX2-only AMD EPYC: a BERT-tiny training step took 6.9x as long in bf16 as in fp32."""
    if name == "bf16" and device.type == "cpu" and cpu_has_bf16_units() is False:
        return ("note: this CPU has no bfloat16 units (AVX-512 BF16 or AMX), so bf16 matrix products are emulated "
                "and several times slower than fp32; use --precision fp32 here")
    return None

