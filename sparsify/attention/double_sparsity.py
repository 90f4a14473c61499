"""Double Sparsity (Yang et al. 2024): the options, and the offline channel calibration.

Not weight pruning. At decode time a query reads, for every cached token, only r calibrated key
channels (the "label cache", optionally quantized to 4 / 8 bits) to score tokens approximately,
then attends exactly (full q, K, V) over the k best tokens (`sparsify.attention.ds_runtime`). The
offline step ranks each key-value head's channels by how much they contribute to q . k:

  qk      mean |q_c k_c| over calibration tokens (after rotary; the paper's default)
  q / k   mean |q_c| / mean |k_c|
  random  a seeded random order (the control)
  auto    the one of qk, q, k whose sparse attention loses least on held-out windows (`ds_select`)

Statistics come from `calibrate.observers.QKStats`: summed over every calibration window (the
reference code overwrote them per window), query heads pooled per key-value head under
grouped-query attention. The full ranking per layer and kv head is stored, so a runtime may read
any r <= head_dim channels of it.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from fractions import Fraction

import torch

from sparsify.errors import UserError

STATISTICS = ("auto", "qk", "q", "k", "random")
CANDIDATES = ("qk", "q", "k")  # what ``auto`` chooses from (random is the control, never chosen)
LABEL_BITS = (4, 8, 16)
SELECT = ("union", "max", "sum", "head")  # how the query heads of a kv head share a selection (ds_runtime.select_tokens)
LABEL_SCALES = ("channel", "token")  # the label codes' quantization grid (ds_runtime.quantize_labels)
TENSOR = "ds.layers.{}.channels"  # int16 (kv_heads, head_dim): channel indices, most important first
RANGE = "ds.layers.{}.label_range"  # float32 (2, kv_heads, head_dim): calibrated [min; max] of every key channel


def parse_amount(text, flag: str, *, allow_count: bool) -> float | int:
    """``1/4``, ``0.25`` -> a fraction in (0, 1]; ``16`` -> a count (when ``allow_count``)."""
    s = str(text).strip()
    try:
        value = Fraction(s)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"{flag} {text!r}: pass a fraction such as 1/4 or 0.25"
                        + (", or a count such as 128" if allow_count else "")) from None
    if any(c in s for c in "/.eE"):  # written as a fraction
        if 0 < value <= 1:
            return float(value)
    elif value >= 1 and allow_count:  # a whole number: a count
        return int(value)
    raise UserError(f"{flag} {text!r}: pass a fraction in (0, 1] such as 1/4"
                    + (", or a whole count >= 1 such as 128" if allow_count else ""))


@dataclass
class DoubleSparsityConfig:
    """Double Sparsity options; recorded in the manifest's "attention" section.

    channels: label channels r per kv head, a fraction of head_dim (1/4) or a count (16).
    tokens: tokens k each query attends to, sink and recent ones included: a count (128) or a
        fraction of that query's causal context (1/16).
    label_bits: 16 (labels kept in fp16), 8 or 4 (round-to-nearest codes, as the runtime would store
        them); the approximate scores use the rounded labels.
    label_scale: the grid of 8 / 4-bit codes. "channel" (default): one scale and zero point per key
        channel, from the range the calibration saw (values beyond it clip), so the cache holds codes
        only; keys have outlier channels (KIVI quantizes keys per channel for that reason) and the
        label channels are those outliers. "token": a scale and zero point per cached token (no
        calibration; 2 x 2 bytes per token and kv head beside 8 bytes of 4-bit codes at r = 16).
    sink / recent: the first ``sink`` and the last ``recent`` tokens of the context (the query's own
        included) are always kept; the top-k by approximate score fills the rest of the k.
    select: "max" (default) shares one selection of k tokens among the query heads of a kv head: the
        tokens with the highest estimated attention probability under any of its heads; "union" fills
        it round-robin from each head's own ranking; "sum" ranks by the heads' summed scores (all three
        read k tokens per kv head); "head" lets every query head select its own k tokens (reads g
        times more under grouped-query attention).
    dense_layers: the first blocks keep dense attention (the paper: 2).
    holdout: held-out calibration windows that score the candidates of ``statistic auto``.
    """

    channels: float | int = 0.25
    tokens: float | int = 128
    label_bits: int = 4
    statistic: str = "auto"
    sink: int = 4
    recent: int = 32
    select: str = "max"
    label_scale: str = "channel"
    dense_layers: int = 2
    holdout: int = 4
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.channels, str):
            self.channels = parse_amount(self.channels, "--ds-channels", allow_count=True)
        if isinstance(self.tokens, str):
            self.tokens = parse_amount(self.tokens, "--ds-tokens", allow_count=True)
        for name, value in (("--ds-channels", self.channels), ("--ds-tokens", self.tokens)):
            if isinstance(value, bool) or not (isinstance(value, int) and value >= 1
                                               or isinstance(value, float) and 0 < value <= 1):
                raise UserError(f"{name} {value!r}: pass a fraction in (0, 1] such as 1/4, or a count >= 1")
        if self.label_bits not in LABEL_BITS:
            raise UserError(f"--ds-label-bits {self.label_bits}: use 4, 8 or 16")
        if self.statistic not in STATISTICS:
            raise UserError(f"--ds-statistic {self.statistic!r}: use one of {', '.join(STATISTICS)}")
        if self.select not in SELECT:
            raise UserError(f"--ds-select {self.select!r}: use one of {', '.join(SELECT)}")
        if self.label_scale not in LABEL_SCALES:
            raise UserError(f"--ds-label-scale {self.label_scale!r}: use one of {', '.join(LABEL_SCALES)}")
        if min(self.sink, self.recent, self.dense_layers) < 0 or self.holdout < 1:
            raise UserError("--ds-sink, --ds-recent and the dense layers must be >= 0, the held-out windows >= 1")
        if isinstance(self.tokens, int) and self.sink + self.recent >= self.tokens:
            raise UserError(f"--ds-tokens {self.tokens} leaves no room for top-k tokens beside {self.sink} sink + "
                            f"{self.recent} recent ones: raise --ds-tokens or lower --ds-sink / --ds-recent")

    def channel_count(self, head_dim: int) -> int:
        """r for this head size (a fraction rounds to the nearest channel, at least 1)."""
        if isinstance(self.channels, int):
            if self.channels > head_dim:
                raise UserError(f"--ds-channels {self.channels} exceeds the head size {head_dim}: pass at most "
                                f"{head_dim} or a fraction such as 1/4")
            return self.channels
        return max(1, min(head_dim, round(self.channels * head_dim)))

    def token_budget(self, context: int) -> int:
        """k for a query whose causal context holds ``context`` tokens."""
        if isinstance(self.tokens, int):
            return self.tokens
        return max(1, math.ceil(self.tokens * context))

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def needs_ranges(self) -> bool:
        """Whether the runtime needs the calibrated channel ranges (`label_ranges`)."""
        return self.label_bits < 16 and self.label_scale == "channel"

    @classmethod
    def from_json(cls, data: dict) -> DoubleSparsityConfig:
        known = set(cls.__dataclass_fields__)
        data = {"label_scale": "token", **data}  # artifacts written before label_scale existed quantized per token
        return cls(**{k: v for k, v in data.items() if k in known})


def attention_modules(block: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The attention modules inside one block that go through transformers' attention interface
    (the criterion of `qk_observer`: a config with ``_attn_implementation`` and a ``head_dim``)."""
    out = []
    for name, module in block.named_modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation") and hasattr(module, "head_dim"):
            out.append((name, module))
    return out


class ChannelCalibration:
    """Collects `QKStats` per block during the runner's statistics pass (an observer factory).

    ``observer(block)`` wraps `qk_observer` and files what it saw under the block's index, so the
    result does not depend on which of the block's Linears are being pruned (with ``--method none``
    none are).
    """

    def __init__(self, layers):
        self.index = {id(block): i for i, block in enumerate(layers)}
        self.stats: dict[int, object] = {}

    @contextmanager
    def observer(self, block):
        from sparsify.calibrate.observers import qk_observer

        with qk_observer(block) as found:
            yield found
        if id(block) in self.index:
            seen = [s for s in found.values() if s.tokens]
            if len(seen) != 1:
                raise UserError(f"double sparsity needs exactly one attention per block going through transformers' "
                                f"attention interface; block {self.index[id(block)]} has {len(seen)}: this "
                                "architecture is not supported, drop --attention")
            self.stats[self.index[id(block)]] = seen[0]

    def check_complete(self, blocks: int) -> None:
        missing = sorted(set(range(blocks)) - set(self.stats))
        if missing:
            raise UserError(f"double sparsity saw no queries and keys in block(s) {missing[:5]}: this model's "
                            "attention does not go through transformers' attention interface; drop --attention")


def rank_channels(stats, statistic: str, *, layer: int = 0, seed: int = 0) -> torch.Tensor:
    """(kv_heads, head_dim) int64: each kv head's channels, most important first.

    Ties keep channel order (stable sort); ``random`` is a seeded permutation per layer and head.
    """
    means = stats.means()
    kv, d = means["k"].shape
    if statistic == "random":
        g = torch.Generator().manual_seed(seed * 1_000_003 + layer)
        return torch.stack([torch.randperm(d, generator=g) for _ in range(kv)])  # (kv, d)
    if statistic not in CANDIDATES:
        raise UserError(f"statistic {statistic!r}: use one of {', '.join(CANDIDATES)} or random")
    return torch.sort(means[statistic].float(), dim=-1, descending=True, stable=True).indices  # (kv, d)


def rankings(stats: dict[int, object], statistic: str, seed: int = 0) -> dict[int, torch.Tensor]:
    """{block index: (kv_heads, head_dim) ranking} for every calibrated block."""
    return {i: rank_channels(s, statistic, layer=i, seed=seed) for i, s in sorted(stats.items())}


def label_ranges(stats: dict[int, object]) -> dict[int, torch.Tensor]:
    """{block index: (2, kv_heads, head_dim) fp32 [min; max]} of every key channel the calibration saw."""
    return {i: torch.stack([s.kmin, s.kmax]).float() for i, s in sorted(stats.items())}


def collect_stats(model, batches: list[dict], device: str = "cpu") -> dict[int, object]:
    """{block index: QKStats} from one block-by-block pass over ``batches``, nothing pruned
    (what `sparsify prune --method none` computes, for scripts that compare statistics)."""
    from sparsify.calibrate import runner
    from sparsify.models.layout import find_blocks

    blocks = find_blocks(model)
    calibration = ChannelCalibration(blocks[0][1])
    runner.run(model, blocks[:1], {}, batches, {}, None, lambda *_: None, device=device,
               observers={"double_sparsity": calibration.observer}, label="calibrating attention")
    calibration.check_complete(len(blocks[0][1]))
    return calibration.stats
