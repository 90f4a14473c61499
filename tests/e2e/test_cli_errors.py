"""Every user error: one line on stderr naming the fix, exit code 2, no traceback, nothing written."""
from __future__ import annotations

import json

import pytest
from helpers import bare_copy, cli, listing
from tiny_models import make_tiny


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama")


def _unsupported(llama, tmp_path):
    import shutil

    d = tmp_path / "gpt_thing"
    shutil.copytree(llama, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "wav2vec2", "architectures": ["Wav2Vec2ForCTC"]}))
    return d


def _nan_weight(llama, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "nan_model"
    shutil.copytree(llama, d)
    state = load_file(d / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    return d


def _text_as_safetensors(llama, tmp_path):
    path = tmp_path / "notes.safetensors"  # a text file renamed
    path.write_text("these are my notes, not tensors\n" * 20)
    return path


def _truncated(llama, tmp_path, bare: bool):
    """The first part of a real checkpoint (a download cut short), as a bare file or in its model directory."""
    import shutil

    d = tmp_path / "cut"
    shutil.copytree(llama, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:len(data) // 3])
    if bare:
        (d / "config.json").unlink()
    return d / "model.safetensors" if bare else d


def _plan_file(tmp_path, rules: str):
    p = tmp_path / "plan.yaml"
    p.write_text(rules)
    return p


def _text_file(tmp_path, text):
    p = tmp_path / "calib.txt"
    p.write_text(text)
    return p


CASES = {
    # name: (make model arg, extra args, words the message must contain)
    "missing path": (lambda l, t: t / "nope", [], ["does not exist"]),
    "unknown alias": (lambda l, t: "smollm9-1b", [], ["smollm2-135m"]),
    "scheme 2:5x": (lambda l, t: l, ["--scheme", "2:5x"], ["2:5x", "2:4"]),
    "scheme 4:2": (lambda l, t: l, ["--scheme", "4:2"], ["4:2"]),
    "sparsity 1": (lambda l, t: l, ["--sparsity", "1.0"], ["[0, 1)"]),
    "sparsity negative": (lambda l, t: l, ["--sparsity", "-0.1"], ["[0, 1)"]),
    "calibrated method on bare file": (bare_copy, ["--method", "wanda"], ["--method magnitude"]),
    "empty calibration text": (lambda l, t: l, ["--calib", "EMPTY"], ["empty"]),
    "too-short calibration text": (lambda l, t: l, ["--calib", "SHORT"], ["--seq-len"]),
    "unsupported architecture": (_unsupported, [], ["Wav2Vec2ForCTC", "ctc", "sparsify handles"]),
    "pickle checkpoint": (lambda l, t: (t / "m.bin").write_bytes(b"x") and t / "m.bin", [], ["safetensors"]),
    "unknown method": (lambda l, t: l, ["--method", "obs"], ["magnitude", "wanda", "sparsegpt"]),
    "unknown method option": (lambda l, t: l, ["--method", "sparsegpt", "--method-arg", "dampp=0.1"], ["damp"]),
    "unknown distill mode": (lambda l, t: l, ["--distill-steps", "2", "--distill-mode", "layerwise"], ["block-wise"]),
    "unknown distill quant": (lambda l, t: l, ["--distill-steps", "2", "--quant", "int8", "--distill-quant", "late"],
                              ["after", "fixed"]),
    "non-positive distill lr": (lambda l, t: l, ["--distill-steps", "2", "--distill-lr", "0"], ["--distill-lr"]),
    "nan in a weight": (lambda l, t: _nan_weight(l, t), [], ["model.layers.1.mlp.up_proj.weight", "NaN"]),
    "plan file missing": (lambda l, t: l, ["--plan", "nope.yaml"], ["--plan", "no such file"]),
    "plan rule typo": (lambda l, t: l, ["--plan", "TYPO"], ["matches no target"]),
    "unknown allocation": (lambda l, t: l, ["--allocation", "owls"], ["owl", "uniform"]),
    "unknown ecoflap norm": (lambda l, t: l, ["--allocation", "ecoflap", "--allocation-arg", "norm=l3"], ["norm", "l1", "l2"]),
    "unknown allocation option": (lambda l, t: l, ["--allocation", "owl", "--allocation-arg", "lambda=1"], ["lam"]),
    # issue 9: corrupt inputs, options that would do nothing, options this machine cannot honour
    "text file named .safetensors": (_text_as_safetensors, [], ["notes.safetensors", "not a valid .safetensors"]),
    "truncated checkpoint": (lambda l, t: _truncated(l, t, bare=False), [], ["truncated", "re-download"]),
    "truncated bare file": (lambda l, t: _truncated(l, t, bare=True), [], ["truncated", "re-download"]),
    "sparsity with N:M": (lambda l, t: l, ["--scheme", "2:4", "--sparsity", "0.7"],
                          ["does nothing", "--scheme unstructured --sparsity 0.7"]),
    "group size without int4": (lambda l, t: l, ["--group-size", "64"], ["--quant int4"]),
    "group size with int8": (lambda l, t: l, ["--quant", "int8", "--group-size", "64"], ["--quant int4"]),
    "unknown scheme": (lambda l, t: l, ["--scheme", "blocky"], ["'unstructured'", "2:4"]),
    "float64": (lambda l, t: l, ["--dtype", "float64"], ["float32, float16, bfloat16"]),
    "float64 on a bare file": (bare_copy, ["--dtype", "float64"], ["float32, float16, bfloat16"]),
    "cuda without a GPU, bare file": (bare_copy, ["--device", "cuda"], ["--device cpu"]),
    "unknown device": (lambda l, t: l, ["--device", "gpu"], ["cpu, cuda"]),
    # issue 14: presets
    "unknown preset": (lambda l, t: l, ["--preset", "quick"], ["fast, best"]),
    "preset and another method": (lambda l, t: l, ["--preset", "best", "--method", "wanda"],
                                  ["--preset best chooses --method sparsegpt", "drop --method wanda"]),
    # issue 15: streaming
    "max memory not a size": (lambda l, t: l, ["--max-memory", "lots"], ["--max-memory 'lots'", "2GB"]),
    "max memory below the plan": (lambda l, t: l, ["--max-memory", "1KB"], ["planned peak", "raise --max-memory"]),
    "activations not a place": (lambda l, t: l, ["--activations", "ssd"], ["--activations 'ssd'", "memory, disk"]),
    "activations in memory over the cap": (lambda l, t: l, ["--max-memory", "300KB", "--activations", "memory",
                                                          "--samples", "64", "--seq-len", "64"],
                                           ["planned peak", "--activations disk"]),
    "max memory with the best preset": (lambda l, t: l, ["--max-memory", "1GB", "--preset", "best", "--scheme", "2:4"],
                                        ["--preset best distills", "--distill-steps 0"]),
    "max memory with an allocator": (lambda l, t: l, ["--max-memory", "1GB", "--allocation", "owl"],
                                     ["--allocation owl", "drop --max-memory"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_error(llama, tmp_path, case):
    import torch

    if "cuda" in case and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    make, extra, words = CASES[case]
    model = make(llama, tmp_path)
    extra = [str(_text_file(tmp_path, "")) if a == "EMPTY" else
             str(_text_file(tmp_path, "only a few words here")) if a == "SHORT" else
             str(_plan_file(tmp_path, 'rules: [{match: "*mlpp*", sparsity: 0.6}]')) if a == "TYPO" else a for a in extra]
    before = listing(tmp_path)
    out = tmp_path / "out"
    result = cli("prune", model, "-o", out, "--samples", "2", "--seq-len", "64", *extra, code=2)
    err = result.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "Traceback" not in result.stdout + err
    for word in words:
        assert word in err, (word, err)
    assert not out.exists()
    assert listing(tmp_path) == before, "something was written"


def test_existing_output_needs_overwrite(llama, tmp_path):
    out = tmp_path / "out"
    args = ["prune", llama, "-o", out, "--method", "magnitude", "--scheme", "2:4"]
    cli(*args)
    stamp = (out / "sparsify.json").read_bytes()
    err = cli(*args, code=2).stderr
    assert "--overwrite" in err and "already exists" in err
    assert (out / "sparsify.json").read_bytes() == stamp
    cli(*args, "--overwrite", "--scheme", "4:8")
    assert json.loads((out / "sparsify.json").read_text())["config"]["scheme"] == "4:8"
    assert listing(tmp_path).count("out") == 1 and not [p for p in listing(tmp_path) if p.startswith(".")]


def test_output_over_input_refused(llama, tmp_path):
    err = cli("prune", llama, "-o", llama, "--overwrite", code=2).stderr
    assert "overwrite the input" in err


def test_eval_and_info_errors(tmp_path):
    assert "sparsify.json" in cli("info", tmp_path, code=2).stderr or "artifact" in cli("info", tmp_path, code=2).stderr
    assert "does not exist" in cli("eval", tmp_path / "missing", code=2).stderr
