"""PEFT counterparts of our adapters, at the settings issue #8 compares them (benchmarks and tests).

Each entry maps a key to ``(our registry name, our config, PEFT config factory, PEFT method)``; the
factory takes the imported ``peft`` module and the target module names, so this file does not
import PEFT.  LoCA has no PEFT counterpart: its peer is PEFT's FourierFT at the same budget.

Reference: S. Mangrulkar et al., "PEFT: State-of-the-art Parameter-Efficient Fine-Tuning methods",
https://github.com/huggingface/peft (0.21).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["PEFT_PEERS"]

PEFT_PEERS: dict[str, tuple[str, dict[str, Any], Callable[[Any, list[str]], Any], str]] = {
    "lora_r16": ("lora", {"rank": 16, "alpha": 16},
                 lambda P, t: P.LoraConfig(r=16, lora_alpha=16, target_modules=t), "lora"),
    "dora_r16": ("dora", {"rank": 16, "alpha": 16},
                 lambda P, t: P.LoraConfig(r=16, lora_alpha=16, use_dora=True, target_modules=t), "dora"),
    "vera_r256": ("vera", {"rank": 256}, lambda P, t: P.VeraConfig(r=256, target_modules=t), "vera"),
    "fourierft_n1000": ("fourierft", {"n_frequency": 1000},
                        lambda P, t: P.FourierFTConfig(n_frequency=1000, target_modules=t), "fourierft"),
    "loca_n1000": ("loca", {"n_frequency": 1000},
                   lambda P, t: P.FourierFTConfig(n_frequency=1000, target_modules=t), "fourierft"),
    "randlora_r32": ("randlora", {"rank": 32}, lambda P, t: P.RandLoraConfig(r=32, target_modules=t), "randlora"),
}
