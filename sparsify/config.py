"""Run configuration: the scheme grammar and the dataclass that describes one prune run.

Scheme strings (``--scheme``):
  ``unstructured``       any pattern, ``sparsity`` of each row (or layer) removed
  ``N:M``                keep N of every M consecutive input columns (``2:4``, ``4:8``; 0 < N < M)
  ``block:RxC``          R x C tiles of the weight kept or removed whole, ``sparsity`` of tiles removed
                         (packed as ``bsr``, unquantized)

`PruneConfig` refuses options that would do nothing rather than record them: ``--sparsity`` other
than the default (0.5) or the scheme's own fraction with an N:M scheme (N:M fixes the fraction),
``--group-size`` without ``--quant int4``, and a ``--dtype`` outside `DTYPES`.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from sparsify.errors import UserError

_NM = re.compile(r"^(\d+):(\d+)$")
_BLOCK = re.compile(r"^block:(\d+)x(\d+)$")


@dataclass(frozen=True)
class Scheme:
    """A sparsity pattern. ``kind`` is ``unstructured``, ``nm`` or ``block``."""

    kind: str
    n: int = 0
    m: int = 0
    block: tuple[int, int] | None = None

    @classmethod
    def parse(cls, text: str | Scheme) -> Scheme:
        if isinstance(text, Scheme):
            return text
        s = str(text).strip().lower()
        if s in ("unstructured", "dense"):
            return cls(kind=s)
        if m := _NM.match(s):
            n, mm = int(m.group(1)), int(m.group(2))
            if not 0 < n < mm:
                raise UserError(f"scheme {text!r}: N:M needs 0 < N < M, e.g. --scheme 2:4 or 4:8")
            return cls(kind="nm", n=n, m=mm)
        if m := _BLOCK.match(s):
            r, c = int(m.group(1)), int(m.group(2))
            if r < 1 or c < 1:
                raise UserError(f"scheme {text!r}: block sizes must be positive, e.g. block:32x32")
            return cls(kind="block", block=(r, c))
        raise UserError(f"unknown scheme {text!r}: use 'unstructured', 'N:M' (e.g. 2:4, 4:8) or 'block:RxC' "
                        "(e.g. block:32x32)")

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block:{self.block[0]}x{self.block[1]}"
        return self.kind

    def target_sparsity(self, sparsity: float) -> float:
        """The fraction of weights this scheme removes at ``sparsity``."""
        return 1 - self.n / self.m if self.kind == "nm" else (0.0 if self.kind == "dense" else sparsity)


def check_sparsity(sparsity: float) -> float:
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"--sparsity {sparsity} is outside [0, 1): pass a fraction such as 0.5")
    return float(sparsity)


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1 << 20,
          "g": 1e9, "gb": 1e9, "gib": 1 << 30, "t": 1e12, "tb": 1e12, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'1GB', '512MiB', '1.5g', '1000000' -> bytes; UserError naming the form otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise UserError(f"--max-memory {text!r}: pass a size such as 2GB, 512MiB or 1.5GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class CalibConfig:
    """Where calibration data comes from and how much of it. ``source`` is a path or ``builtin``."""

    source: str = "builtin"
    samples: int = 32
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 8


DISTILL_MODES = ("auto", "end-to-end", "block-wise")
DISTILL_QUANT = ("after", "fixed")  # when --quant rounds a distilled run's weights (see sparsify.distill)
DTYPES = ("float32", "float16", "bfloat16")  # what --dtype may ask for (float64: no kernel, no format computes in it)
DEFAULT_SPARSITY = 0.5
ACTIVATIONS = ("auto", "memory", "disk")  # where calibration activations live (`sparsify.calibrate.spill`)


@dataclass
class PruneConfig:
    """Everything that defines one prune run; recorded verbatim in the artifact manifest.

    ``method_args`` holds the method's own hyper-parameters (fields of its config dataclass,
    e.g. ``{"damp": 0.01, "blocksize": 128}`` for SparseGPT); unknown keys are an error.
    """

    method: str = "wanda"
    scheme: Scheme = field(default_factory=lambda: Scheme("unstructured"))
    sparsity: float = DEFAULT_SPARSITY
    per: str = "row"  # unstructured only: "row" (each output row) or "layer" (one threshold)
    quant: str = "none"  # none | int8 | int4 | fp8 | w8a8 (see sparsify.quant.spec)
    group_size: int | None = None  # int4 quantization group along the input dim (None: the quantizer's default)
    joint_quant: bool = True  # quantize inside the pruner's loop when it can (SparseGPT); False: prune, then round
    distill_steps: int | None = None  # sparse distillation steps after pruning (0: off; None: the preset's, else 0)
    distill_mode: str = "auto"  # auto | end-to-end | block-wise (see sparsify.distill)
    distill_lr: float | None = None  # AdamW learning rate of the distillation (None: the preset's, else 1e-4)
    distill_quant: str = "after"  # with --quant: prune and distill in float, then round | fixed: distill on the pruner's grid
    targets: list[str] | None = None
    ignore: list[str] | None = None
    method_args: dict = field(default_factory=dict)
    plan: str | list | None = None  # rules file / artifact (see sparsify.plan), or a list of rule dicts
    allocation: str = "uniform"  # per-layer sparsity allocator (sparsify.allocators): uniform | owl
    allocation_args: dict = field(default_factory=dict)  # the allocator's options (e.g. {"lam": 0.08})
    calib: CalibConfig = field(default_factory=CalibConfig)
    device: str = "cpu"
    dtype: str | None = None
    attention: object = None  # None, or a `sparsify.attention.double_sparsity.DoubleSparsityConfig` (or its dict)
    preset: str | None = None  # `sparsify.presets`: sets method (and its options) to the preset's choice
    max_memory: str | None = None  # stream the checkpoint block by block under this cap (`sparsify.streaming`)
    activations: str = "auto"  # calibration activations: memory | disk | auto (disk when --max-memory needs it)

    def __post_init__(self):
        self.scheme = Scheme.parse(self.scheme)
        from sparsify.presets import distill_settings, resolve

        if self.preset is not None:
            self.method, self.method_args = resolve(self.preset, self.method_args)
        d = distill_settings(self.preset, distill_steps=self.distill_steps, distill_lr=self.distill_lr)
        self.distill_steps, self.distill_lr = d["distill_steps"], d["distill_lr"]
        if isinstance(self.attention, dict):
            from sparsify.attention.double_sparsity import DoubleSparsityConfig

            self.attention = DoubleSparsityConfig.from_json(self.attention)
        check_sparsity(self.sparsity)
        if self.max_memory is not None:
            parse_size(self.max_memory)
        if self.activations not in ACTIVATIONS:
            raise UserError(f"--activations {self.activations!r}: use {', '.join(ACTIVATIONS)}")
        if self.per not in ("row", "layer"):
            raise UserError(f"--per {self.per!r}: use 'row' or 'layer'")
        if self.distill_mode not in DISTILL_MODES:
            raise UserError(f"--distill-mode {self.distill_mode!r}: use {', '.join(DISTILL_MODES)}")
        if self.distill_quant not in DISTILL_QUANT:
            raise UserError(f"--distill-quant {self.distill_quant!r}: use {', '.join(DISTILL_QUANT)}")
        if self.distill_steps < 0 or not self.distill_lr > 0:
            raise UserError("--distill-steps must be >= 0 and --distill-lr > 0")
        self._refuse_idle_options()

    def _refuse_idle_options(self) -> None:
        """Options that would change nothing are errors, so that the manifest never records them as done."""
        s = self.scheme
        if s.kind == "nm" and self.sparsity != DEFAULT_SPARSITY and abs(self.sparsity - s.target_sparsity(0)) > 5e-3:
            raise UserError(f"--sparsity {self.sparsity} does nothing with --scheme {s}, which always removes "
                            f"{s.target_sparsity(0):.0%}: drop --sparsity, or use --scheme unstructured "
                            f"--sparsity {self.sparsity}")
        if self.group_size is not None and str(self.quant).lower() != "int4":
            raise UserError(f"--group-size applies to --quant int4 only (here --quant {self.quant}): drop --group-size "
                            "or pass --quant int4")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["scheme"] = str(self.scheme)
        return d
