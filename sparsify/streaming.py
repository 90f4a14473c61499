"""Streaming prune (``--max-memory``): a checkpoint larger than memory, one block resident at a time.

The model is built on the meta device; the tensors outside the blocks (embeddings, final norm, head)
are read in first, then each block is read from the safetensors files when the runner reaches it
(`sparsify.models.stream`), calibrated, pruned, forwarded to make the next block's inputs, packed into
the artifact's shards and sent back to meta. The artifact holds the same tensors and manifest entries
as the in-memory run (tested bit for bit); only the order of tensors inside the files differs.

Before any block is read, `plan_peak` adds up what will be resident (an upper bound: the parts
outside the blocks, a block twice over while it is pruned, the calibration activations, one batch's
forward, the statistics and the largest solve) and the run stops with the fix when that exceeds
``--max-memory``. With ``--activations auto`` the activations go to disk (`calibrate.spill`, one
batch in memory) when the plan with them in memory would exceed the cap. What streaming cannot do is refused up front: allocators that score the whole
model, Double Sparsity, distillation (they need every block at once), several block lists (CLIP's
two towers: capturing the second runs the first), and parameters shared between blocks. Under
torchrun every process streams the same blocks under its own cap; rank 0 alone writes.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from sparsify.calibrate import distributed
from sparsify.config import parse_size
from sparsify.errors import UserError
from sparsify.presets import preset_hint
from sparsify.resources import trim_freed_memory

def mib(n: float) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def check_streamable(config, blocks, weights) -> None:
    """UserError for what a streamed run cannot do (module docstring), naming the fix."""
    why = None
    if config.allocation != "uniform":
        why = f"--allocation {config.allocation} scores the whole model at once"
    elif config.attention is not None:
        why = "--attention calibrates every block's attention together"
    elif config.distill_steps:
        why = "--distill-steps trains the whole model after pruning" + preset_hint(config.preset)
    elif len(blocks) != 1:
        why = f"this model has {len(blocks)} block lists ({', '.join(p for p, _ in blocks)}); capturing a later one runs the earlier"
    if why is None:
        prefix = blocks[0][0]
        for names in {tuple(v) for v in weights.groups.values() if len(v) > 1}:
            owners = {".".join(n[len(prefix) + 1:].split(".")[:1]) if n.startswith(prefix + ".") else "" for n in names}
            if len(owners) > 1:
                why = f"{names[0]} is shared with {names[1]}, across blocks"
                break
    if why:
        raise UserError(f"--max-memory cannot stream this run: {why}; drop --max-memory (or that option)")


def _solve_bytes(mods) -> tuple[int, int]:
    """(statistics, largest solve) bytes of one block's targets ({name: module}): an (in, in) fp32
    statistic per target (shared ones counted again: an upper bound), and the largest solve of the
    matrices that may share an input and be stacked (siblings of one parent module with the same
    in_features: q/k/v/o, gate/up) with five fp32 copies of the stack (input, working copy, masks,
    result) and three (in, in) matrices beside the statistic (`Hessian.factor`'s temporaries)."""
    stacks: dict[tuple[str, int], int] = {}
    stats = 0
    for name, m in mods.items():
        o, i = m.weight.shape
        stats += i * i * 4
        key = (name.rpartition(".")[0], i)
        stacks[key] = stacks.get(key, 0) + o
    solve = max((5 * rows * i * 4 + 3 * i * i * 4 for (_, i), rows in stacks.items()), default=0)
    return stats, solve


def plan_peak(loaded, weights, blocks, planned, calib, captured: list[str],
              spilled: bool = False) -> dict[str, dict[str, int]]:
    """Bytes resident in each phase of a streamed run, by part (upper bounds; module docstring).
    ``captured``: the tensors outside the blocks that the capture reads; ``spilled``: activations on
    disk (`calibrate.spill`), of which one batch is in memory at a time."""
    from sparsify import registry

    prefix, layers = blocks[0]
    block_names = [weights.names_under(f"{prefix}.{i}") for i in range(len(layers))]
    block = max(weights.nbytes(names) for names in block_names)
    inside = {n for names in block_names for n in names}
    config = loaded.config.get_text_config() if hasattr(loaded.config, "get_text_config") else loaded.config
    item = torch.empty(0, dtype=loaded.dtype).element_size()
    needs_data = any(registry.get(registry.PRUNERS, planned.plans[n].method, "method").stats is not None
                     for mods in planned.active.values() for n in mods)
    solves = [_solve_bytes(mods) for mods in planned.active.values()] or [(0, 0)]
    widest = max((max(m.weight.shape) for mods in planned.active.values() for m in mods.values()), default=0)
    hidden = getattr(config, "hidden_size", None) or widest
    batch = min(calib.batch_size, calib.samples)
    heads = getattr(config, "num_attention_heads", None) or 1
    activations = (batch if spilled else calib.samples) * calib.seq_len * hidden * item * needs_data
    forward = (3 * batch * calib.seq_len * widest * 4 + batch * heads * calib.seq_len ** 2 * 4) * needs_data
    rest = max((weights.nbytes(weights.groups[n]) for n in weights.groups if n not in inside), default=0)
    return {
        "capture": {"embeddings and what else runs before block 0": weights.nbytes(captured) * needs_data,
                    "block 0": block * needs_data, "block 0's inputs": activations, "one batch's forward": forward},
        "blocks": {"one block, before and after pruning": 2 * block, "its inputs and outputs": 2 * activations,
                   "one batch's forward": forward, "statistics": max(s for s, _ in solves) * needs_data,
                   "largest solve": max(v for _, v in solves)},
        "writing the rest": {"largest tensor outside the blocks, read and written": 2 * rest},
    }


SLACK = 0.10  # allocator slack on top of the planned parts


def peak_of(phases: dict[str, dict[str, int]]) -> tuple[str, dict[str, int], int]:
    """(the largest phase, its parts, its total plus `SLACK`)."""
    phase, parts = max(phases.items(), key=lambda kv: sum(kv[1].values()))
    return phase, parts, int(sum(parts.values()) * (1 + SLACK))


def check_plan(phases: dict[str, dict[str, int]], cap: int, echo, spilled: bool = False) -> int:
    """Print the planned peak; UserError naming its largest part and the fix when it exceeds ``cap``.
    Returns the peak."""
    phase, parts, total = peak_of(phases)
    where = "on disk" if spilled else "in memory"
    if total > cap:
        part, size = max(parts.items(), key=lambda kv: kv[1])
        raise UserError(f"--max-memory {mib(cap)} is below this run's planned peak of {mib(total)} (while {phase}, "
                        f"largest part: {part}, {mib(size)}; activations {where}): raise --max-memory, or lower "
                        f"--samples / --seq-len / --batch-size{'' if spilled else ', or pass --activations disk'}")
    echo(f"streaming: planned peak {mib(total)} of --max-memory {mib(cap)}, activations {where}, while {phase}: "
         + ", ".join(f"{k} {mib(v)}" for k, v in parts.items() if v) + f", allocator slack {SLACK:.0%}")
    return total


class BlockStreamer:
    """The runner's ``residency``: reads a block in when it is reached, packs and frees it when done.

    Tensors outside the blocks are read only while needed: for the capture (which runs the embeddings
    and block 0), less the output head, which no capture reaches; and at the end, one tied group at
    a time, to be written.
    """

    def __init__(self, weights, packer, result, device: str, outside: list[str], head: set[str]):
        self.weights, self.packer, self.result, self.device = weights, packer, result, device
        self.outside, self.head = outside, head

    def enter(self, name: str, block) -> None:
        from sparsify.planning import check_finite_weights

        self.weights.load(self.weights.names_under(name))
        block.to(self.device)
        check_finite_weights(block, prefix=name)

    @contextmanager
    def capturing(self, name: str, block):
        needed = [n for n in self.outside if n not in self.head]
        self.weights.load(needed)
        try:
            self._check(needed)
            self.enter(name, block)
            yield
        finally:
            self.weights.unload(needed)

    def _check(self, names) -> None:
        from sparsify.planning import check_finite_tensor

        for n in names:
            check_finite_tensor(n, self.weights.current(n))

    def leave(self, name: str, block) -> None:
        if self.packer is not None:  # None on the processes that do not write (torchrun ranks > 0)
            self.packer.add({f"{name}.{k}": t for k, t in block.state_dict().items()}, self.result.qparams)
        self.weights.release(block)
        trim_freed_memory()

    def finish(self) -> None:
        """Pack what lies outside the blocks, one tied group at a time."""
        done = set(self.packer.written)
        for n in self.outside:
            if n in done:
                continue
            group = [t for t in self.weights.groups[n] if t not in done]
            self.weights.load(group)
            self._check(group)
            self.packer.add({t: self.weights.current(t) for t in group}, self.result.qparams)
            self.weights.unload(group)
            done.update(group)


def prepare(loaded, planned, config):
    """Check and plan a streamed run; returns (`StreamedWeights`, tensor names outside the blocks,
    those of the output head, the manifest's "streaming" section). The plan line goes to stderr
    (rank 0's: under torchrun every process plans for itself, the same plan)."""
    import sys

    from sparsify.models.layout import find_blocks
    from sparsify.models.stream import StreamedWeights

    blocks = find_blocks(loaded.model)
    weights = StreamedWeights(loaded.model, loaded.source.weight_files, device=config.device)
    check_streamable(config, blocks, weights)
    prefix = blocks[0][0]
    outside = [n for n in weights.groups if not n.startswith(prefix + ".")]
    head = set(output_head(loaded.model, weights))
    cap = parse_size(config.max_memory)
    captured = [n for n in outside if n not in head]
    spilled = config.activations == "disk"
    phases = plan_peak(loaded, weights, blocks, planned, config.calib, captured, spilled)
    if config.activations == "auto" and peak_of(phases)[2] > cap:  # in memory they do not fit: try disk
        spilled = True
        phases = plan_peak(loaded, weights, blocks, planned, config.calib, captured, spilled)
    peak = check_plan(phases, cap, lambda line: print(line, file=sys.stderr) if distributed.is_main() else None, spilled)
    for module in loaded.model.modules():  # buffers computed at construction (rotary tables) stay resident
        for k, b in module._buffers.items():
            if b is not None and b.device.type != "meta":
                module._buffers[k] = b.to(config.device)
    return weights, outside, head, {"max_memory_bytes": cap, "planned_peak_bytes": peak, "planned": phases,
                                    "activations": "disk" if spilled else "memory"}


def output_head(model, weights) -> list[str]:
    """Names of the output head's tensors (``get_output_embeddings``), unless tied to something outside it."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get else None
    if head is None:
        return []
    owner = next((n for n, m in model.named_modules() if m is head), None)
    names = [n for n in weights.groups if owner and n.startswith(owner + ".")]
    return [n for n in names if all(t.startswith(owner + ".") for t in weights.groups[n])]
