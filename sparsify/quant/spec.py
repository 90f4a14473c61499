"""What to quantize to: `QuantSpec` (parsed from ``--quant`` / ``--group-size``) and `QuantParams`.

Groups run along the INPUT dimension in dense column coordinates: column ``c`` belongs to group
``c // group_size`` (per output channel: one group of the whole row; the last group may be partial).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from sparsify.errors import UserError

KINDS = ("int8", "int4", "fp8")
INT4_GROUPS = (32, 64, 128)


@dataclass(frozen=True)
class QuantSpec:
    kind: str  # int8 | int4 | fp8
    group_size: int | None = None  # None: per output channel
    symmetric: bool = True
    activations: str | None = None  # "int8" for w8a8 (quantized at run time, per token)

    @classmethod
    def parse(cls, quant: str | None, group_size: int | None = None, symmetric: bool | None = None):
        """The spec for ``--quant`` / ``--group-size``.

        ``none`` -> None; ``int8`` / ``fp8`` per output channel; ``int4`` groups of 32 / 64 / 128 input
        columns (default 128; 0 = per output channel), symmetric unless ``symmetric=False``;
        ``w8a8`` = int8 weights per channel, ``activations="int8"`` (quantized by the runtime).
        Bad values raise `UserError`."""
        quant = (quant or "none").lower()
        if quant == "none":
            return None
        if quant == "w8a8":
            return cls("int8", None, True, activations="int8")
        if quant not in KINDS:
            raise UserError(f"--quant {quant!r}: choose none, int8, int4, fp8 or w8a8")
        if quant != "int4":
            if group_size:
                raise UserError(f"--group-size applies to int4 only ({quant} is per output channel): drop it")
            return cls(quant, None, True)
        group_size = 128 if group_size is None else group_size
        if group_size not in (0, *INT4_GROUPS):
            sizes = ", ".join(map(str, INT4_GROUPS))
            raise UserError(f"--group-size {group_size}: use one of {sizes} or 0 (per channel)")
        return cls("int4", group_size or None, True if symmetric is None else symmetric)

    def groups(self, in_features: int) -> tuple[int, int]:
        """(actual group size, number of groups) for a row of ``in_features``."""
        size = self.group_size or in_features
        return size, -(-in_features // size)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class QuantParams:
    """Scales (and zero points) of one weight: scale float32 (out, ngroups); zero uint8 (out, ngroups)
    for asymmetric int4, None otherwise (int8: 0, symmetric int4: 8)."""

    spec: QuantSpec
    scale: torch.Tensor
    zero: torch.Tensor | None = None

    @property
    def group_size(self) -> int:
        return self.spec.group_size or 0

    def attrs(self, in_features: int) -> dict:
        attrs = {"quant": self.spec.kind, "group_size": self.spec.groups(in_features)[0],
                 "symmetric": self.spec.symmetric}
        if self.spec.activations:
            attrs["activations"] = self.spec.activations  # w8a8: int8 activations at run time
        return attrs
