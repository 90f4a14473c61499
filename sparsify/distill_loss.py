"""Losses and training-time helpers of sparse distillation (`sparsify.distill`).

- `chunked_kl`: KL(teacher || student) over the vocabulary, computed from the final hidden states a
  chunk of tokens at a time with its gradient formed on the spot, so that neither model's full
  (tokens, vocab) logits ever exist (SmolLM2 at 4 x 512 tokens: 400 MB per copy in float32).
- `feature_loss`: the per-block feature loss, each block's output MSE divided by the teacher
  output's mean square (scale-free across blocks whose activations differ by orders of magnitude).
- `BlockRecorder`: forward hooks that keep each block's output while switched on.
- `FakeQuant`: the straight-through fake quantizer used as a weight parametrization.
- `masked_step` / `finalize`: the optimizer step that cannot touch a pruned position, and the exit
  step that puts weights back on their grid with exactly the entry mask.
- Block-wise plumbing: `run_block` / `with_hidden` (one block on captured inputs), `DenseWeights`
  (the checkpoint's dense weights, one tensor at a time), `PeakRss` (sampled peak resident memory).
"""
from __future__ import annotations

import threading

import psutil
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from sparsify.quant import rtn


def kl_logits(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Summed KL(teacher || student) over rows of (rows, classes) logits, in float32."""
    s, t = F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1)  # (rows, classes)
    return F.kl_div(s, t, log_target=True, reduction="sum")


class _HeadKL(torch.autograd.Function):
    """Summed KL(teacher || student) of the logits ``head(hidden)``, chunk by chunk. The gradient w.r.t.
    the student's hidden states, (softmax(z_s) - softmax(z_t)) @ W_head, is formed in the forward and
    kept ((tokens, hidden): small), so no (chunk, vocab) tensor outlives its chunk and the frozen heads
    run 3 matmuls per chunk instead of 6 (forward, checkpoint recompute, backward)."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, s_head: nn.Module, t_head: nn.Module, chunk: int):
        total, grad, w = s.new_zeros((), dtype=torch.float32), torch.empty_like(s), s_head.weight  # w: (vocab, hidden)
        for i in range(0, s.shape[0], chunk):
            log_s = F.log_softmax(s_head(s[i:i + chunk]).float(), -1)  # (chunk, vocab)
            log_t = F.log_softmax(t_head(t[i:i + chunk]).float(), -1)  # (chunk, vocab)
            p_t = log_t.exp()
            total += (p_t * (log_t - log_s)).sum()
            grad[i:i + chunk] = ((log_s.exp() - p_t).to(w.dtype) @ w).to(s.dtype)  # (chunk, hidden)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return g * grad, None, None, None, None


def chunked_kl(s_hidden: torch.Tensor, t_hidden: torch.Tensor, s_head: nn.Module, t_head: nn.Module,
               mask: torch.Tensor | None = None, chunk: int = 512) -> torch.Tensor:
    """Mean per-token KL(teacher || student) of the logits ``head(hidden)``, ``chunk`` tokens at a time
    (`_HeadKL`; the heads are frozen: no gradient reaches their weights).

    Args:
        s_hidden, t_hidden: (batch, T, hidden) final hidden states of student and teacher.
        s_head, t_head: the output projections (``get_output_embeddings()``).
        mask: (batch, T) attention mask; padded positions do not count.
    """
    keep = mask.bool() if mask is not None else torch.ones(s_hidden.shape[:2], dtype=torch.bool, device=s_hidden.device)
    s, t = s_hidden[keep], t_hidden[keep]  # (tokens, hidden)
    return _HeadKL.apply(s, t.detach(), s_head, t_head, chunk) / max(1, s.shape[0])


def normalized_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """||s - t||^2 / ||t||^2 (both as means), float32."""
    t = teacher.float()
    return F.mse_loss(student.float(), t) / t.pow(2).mean().clamp(min=1e-12)


def feature_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of the normalised MSE between matching block outputs."""
    if len(student) != len(teacher) or not student:
        raise RuntimeError(f"recorded {len(student)} student and {len(teacher)} teacher block outputs")
    return torch.stack([normalized_mse(s, t) for s, t in zip(student, teacher)]).mean()


def block_output(out) -> torch.Tensor:
    """The hidden states a transformer block returns (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


class BlockRecorder:
    """Keeps the output of every module in ``blocks`` (in call order) while ``on`` is True."""

    def __init__(self, blocks: list[nn.Module]):
        self.on, self.outputs = False, []
        self.handles = [b.register_forward_hook(self._hook) for b in blocks]

    def _hook(self, _module, _inputs, out):
        if self.on:
            self.outputs.append(block_output(out))

    def take(self) -> list[torch.Tensor]:
        outs, self.outputs = self.outputs, []
        return outs

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.outputs = []


class FakeQuant(nn.Module):
    """Weight parametrization: forward = the weight snapped onto its FIXED quantization grid, backward =
    identity (straight-through estimator). Scales broadcast per group, so no per-element copy of them
    is kept; the arithmetic is `rtn.snap`'s, element for element."""

    def __init__(self, params, in_features: int):
        super().__init__()
        self.params = params
        size, ngroups = params.spec.groups(in_features)
        self.size = size if size * ngroups == in_features else None  # None: ragged last group, use rtn.snap
        zero = params.zero.float() if params.zero is not None else torch.full_like(
            params.scale, 8.0 if params.spec.kind == "int4" else 0.0)
        self.register_buffer("scale", params.scale.unsqueeze(-1), persistent=False)  # (out, ngroups, 1)
        self.register_buffer("zero", zero.unsqueeze(-1), persistent=False)  # (out, ngroups, 1)

    def snap(self, w: torch.Tensor) -> torch.Tensor:
        if self.size is None:
            return rtn.snap(w, self.params)
        g = w.view(w.shape[0], -1, self.size)  # (out, ngroups, size)
        scale, zero = self.scale.to(w.device), self.zero.to(w.device)
        q = rtn.decode(rtn.encode(g, scale, zero, self.params.spec.kind), scale, zero, w.dtype)
        return q.view_as(w)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (self.snap(w.detach()) - w).detach()


def masked_step(opt: torch.optim.Optimizer, params: list[nn.Parameter], masks: list[torch.Tensor]) -> None:
    """Zero the gradients at pruned positions, step, re-apply the mask (pruned weights stay exactly 0)."""
    with torch.no_grad():
        for p, keep in zip(params, masks):
            if p.grad is not None:
                p.grad.mul_(keep)
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p, keep in zip(params, masks):
            p.mul_(keep)


def _smallest_on_grid(sign: torch.Tensor, params, rows: torch.Tensor, cols: torch.Tensor, in_features: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """The grid value one step from zero with ``sign`` (the other sign where the grid has no such value,
    e.g. asymmetric int4 with zero point 0) at elements (rows, cols)."""
    scale, zero = rtn.expand_params(params, rows, cols, in_features)  # (k,), (k,)

    def on_grid(v):
        return rtn.decode(rtn.encode(v, scale, zero, params.spec.kind), scale, zero, dtype)

    first = on_grid(sign * scale)  # (k,)
    return torch.where(first == 0, on_grid(-sign * scale), first)


def finalize(flat: dict[str, nn.Linear], masks: dict[str, torch.Tensor], signs: dict[str, torch.Tensor],
             qparams: dict) -> int:
    """Snap each weight onto its quantization grid (if any), nudge a kept weight that is exactly 0.0 to
    the smallest non-zero value of its entry sign (grid step, or the dtype's smallest normal number),
    zero the pruned positions. Returns how many kept weights were nudged."""
    nudged = 0
    with torch.no_grad():
        for name, lin in flat.items():
            w, keep, p = lin.weight, masks[name], qparams.get(name)
            q = rtn.snap(w, p) if p is not None else w.clone()  # (out, in)
            rows, cols = (keep & (q == 0)).nonzero(as_tuple=True)
            if rows.numel():
                nudged += rows.numel()
                sign = signs[name][rows, cols].float()  # (k,)
                q[rows, cols] = (_smallest_on_grid(sign, p, rows, cols, w.shape[1], w.dtype) if p is not None
                                 else (sign * torch.finfo(w.dtype).tiny).to(w.dtype))
            w.copy_(torch.where(keep, q, torch.zeros((), dtype=w.dtype)))
    return nudged


def plain(obj, device):
    """Copy tensors in nested args/kwargs to ``device`` as ordinary tensors (not inference tensors)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device).clone()
    if isinstance(obj, (tuple, list)):
        return type(obj)(plain(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: plain(v, device) for k, v in obj.items()}
    return obj


def with_hidden(sample: tuple, hidden: torch.Tensor) -> tuple:
    args, kwargs = sample
    return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})


def run_block(block: nn.Module, sample: tuple, device: str) -> torch.Tensor:
    args, kwargs = plain(sample, device)
    return block_output(block(*args, **kwargs))


class DenseWeights:
    """The checkpoint's own (dense) weights of named Linears, read one tensor at a time from the
    safetensors files where a file key is the module name (+ ``.weight``, possibly under a prefix).
    Names that transformers renames on load (e.g. ViT's ``encoder.layer.*.attention.attention.query``
    -> ``layers.*.attention.q_proj``) are taken once from a full dense model, ``load_teacher()``,
    kept on CPU, and the model freed."""

    def __init__(self, source, names: list[str], load_teacher):
        where = {}
        for f in source.weight_files:
            with safe_open(str(f), "pt") as fh:
                where.update(dict.fromkeys(fh.keys(), f))
        self.files, self.held = {}, {}
        for name in names:
            key = f"{name}.weight"
            hits = [key] if key in where else [k for k in where if k.endswith("." + key)]
            if len(hits) == 1:
                self.files[name] = (where[hits[0]], hits[0])
        missing = [n for n in names if n not in self.files]
        if missing:
            teacher = load_teacher()
            self.held = {n: teacher.get_submodule(n).weight.detach().to("cpu", copy=True) for n in missing}
            del teacher

    def get(self, name: str, like: torch.Tensor) -> torch.Tensor:
        if name in self.held:
            return self.held[name].to(device=like.device, dtype=like.dtype)
        path, key = self.files[name]
        with safe_open(str(path), "pt") as fh:
            return fh.get_tensor(key).to(device=like.device, dtype=like.dtype)


class PeakRss:
    """Samples this process's resident memory every 20 ms in a thread; ``peak_mb`` is the highest seen."""

    def __enter__(self):
        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)
