"""Default targets of a bare ``.safetensors`` file: every 2-D float weight but embeddings, norms, heads."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

import sparsify
from sparsify.bare import default_targets

PRUNED = ["encoder.fc_in.weight", "attn.c_attn.weight", "layers.0.mlp.up_proj.weight", "pooler.dense.weight",
          "proj.weight"]
KEPT = {
    "quant.codes.weight": torch.ones(8, 16, dtype=torch.int8),  # integer codes
    "attn.mask.weight": torch.ones(8, 16, dtype=torch.bool),
    "embeddings.word_embeddings.weight": torch.randn(32, 16),
    "embeddings.token_type_embeddings.weight": torch.randn(2, 16),
    "wte.weight": torch.randn(32, 16), "wpe.weight": torch.randn(32, 16), "shared.weight": torch.randn(32, 16),
    "blocks.0.norm1.weight": torch.randn(8, 16),  # a 2-D "norm": excluded by name
    "h.0.ln_1.weight": torch.randn(16), "LayerNorm.weight": torch.randn(16),
    "lm_head.weight": torch.randn(32, 16), "head.weight": torch.randn(10, 16), "cls_head.weight": torch.randn(10, 16),
    "classifier.weight": torch.randn(10, 16), "score.weight": torch.randn(2, 16),
    "encoder.fc_in.bias": torch.randn(8), "conv.weight": torch.randn(8, 3, 2, 2),
    "encoder.fc_in.scale": torch.randn(8, 16),  # 2-D but not a weight
}


def _file(tmp_path):
    tensors = {**{n: torch.randn(8, 16) for n in PRUNED}, **KEPT}
    tensors["proj.weight"] = torch.randn(8, 16, dtype=torch.float16)
    path = tmp_path / "odd.safetensors"
    save_file(tensors, path)
    return path, tensors


def test_default_targets_by_dtype_shape_and_role(tmp_path):
    _, tensors = _file(tmp_path)
    names = list(tensors)
    shapes = {n: list(t.shape) for n, t in tensors.items()}
    dtypes = {n: {torch.float32: "F32", torch.float16: "F16", torch.int8: "I8", torch.bool: "BOOL"}[t.dtype]
              for n, t in tensors.items()}
    assert sorted(default_targets(names, shapes, dtypes)) == sorted(PRUNED)
    assert default_targets(["x.weight"], {"x.weight": [4, 4]}, {"x.weight": "F8_E4M3"}) == []


def test_bare_prune_packs_exactly_the_default_targets(tmp_path):
    path, tensors = _file(tmp_path)
    m = sparsify.prune(str(path), sparsify.PruneConfig(method="magnitude", sparsity=0.5), tmp_path / "out")
    assert sorted(m["tensors"]) == sorted(PRUNED)
    assert all(m["tensors"][n]["sparsity"] == 0.5 for n in PRUNED)
    # N:M: a Conv1D-style name is stored (in, out) in GPT-2 checkpoints; without a config it is left alone
    m = sparsify.prune(str(path), sparsify.PruneConfig(method="magnitude", scheme="2:4"), tmp_path / "nm")
    assert sorted(m["tensors"]) == sorted(set(PRUNED) - {"attn.c_attn.weight"})
    assert "Conv1D" in m["skipped"]["attn.c_attn.weight"]
    m = sparsify.prune(str(path), sparsify.PruneConfig(method="magnitude", scheme="2:4", targets=["*c_attn*"]),
                       tmp_path / "asked")
    assert list(m["tensors"]) == ["attn.c_attn.weight"]  # named in --targets: the user knows its layout
