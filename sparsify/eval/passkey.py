"""Passkey retrieval: a random 5-digit number hidden at a random depth of long filler text, asked for
at the end, answered by greedy decoding (the test of Mohtashami & Jaggi 2023, used for sparse attention).

Each trial draws (seeded) a key in [10000, 99999] and a depth in [0, 1]; the prompt is an
instruction, filler sentences (five, cycled) with the key's sentence after that fraction of them, and the
question, ``seq_len - answer_tokens`` tokens in all, so prompt and answer fit the stated context.
A trial is correct when the first number in the decoded answer (spaces between digits removed) is
the key. With Double Sparsity installed, every position of the prompt already runs the sparse
attention (the decode simulation), and the answer's tokens are decoded with it over the cache.
"""
from __future__ import annotations

import re

import torch

from sparsify.errors import UserError

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
FILLER = (" The grass is green.", " The sky is blue.", " The sun is yellow.", " Here we go.", " There and back again.")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
ANSWER_TOKENS = 8


def _ids(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"]


def build_prompt(tokenizer, key: int, depth: float, length: int) -> torch.Tensor:
    """(1, <= length) token ids: intro, filler sentences (cycled) with the key's sentence at ``depth``, question.

    The intro is left out when it does not fit beside one round of filler (tiny test models).
    """
    intro, needle, question = _ids(tokenizer, INTRO, special=True), _ids(tokenizer, NEEDLE.format(key=key)), \
        _ids(tokenizer, QUESTION)
    sentences = [_ids(tokenizer, f) for f in FILLER]
    if length - len(intro) - len(needle) - len(question) < sum(map(len, sentences)):
        intro = _ids(tokenizer, "", special=True)  # only the special tokens the tokenizer adds (e.g. BOS)
    room = length - len(intro) - len(needle) - len(question)
    filler: list[list[int]] = []
    while room >= len(sentences[len(filler) % len(sentences)]):
        filler.append(sentences[len(filler) % len(sentences)])
        room -= len(filler[-1])
    if not filler:
        raise UserError(f"--seq-len {length + ANSWER_TOKENS} is too short for a passkey prompt: pass at least "
                        f"{length + ANSWER_TOKENS - room + max(map(len, sentences))}")
    at = round(depth * len(filler))
    ids = intro + [t for f in filler[:at] for t in f] + needle + [t for f in filler[at:] for t in f] + question
    return torch.tensor([ids], dtype=torch.long)  # (1, L)


def answer_of(text: str) -> str | None:
    """The first number in the decoded answer, spaces between its digits removed."""
    found = re.search(r"\d(?:\s*\d)*", text)
    return re.sub(r"\s", "", found.group(0)) if found else None


@torch.inference_mode()
def passkey(model, tokenizer, seq_len: int, trials: int = 20, seed: int = 0, progress=None) -> dict:
    """Accuracy over ``trials`` seeded passkey prompts of ``seq_len`` tokens (answer included).

    Returns:
        {"accuracy", "correct", "trials", "seq_len", "prompt_tokens" (mean), "seed",
         "results": [{"key", "depth", "answer", "correct"}]}.
    """
    if trials < 1:
        raise UserError(f"--trials {trials}: pass a positive number of passkey trials")
    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results, lengths = [], []
    for _ in range(trials):
        key = int(torch.randint(10000, 100000, (1,), generator=g))
        depth = float(torch.rand((), generator=g))
        ids = build_prompt(tokenizer, key, depth, seq_len - ANSWER_TOKENS).to(device)  # (1, L)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=ANSWER_TOKENS,
                             do_sample=False, pad_token_id=pad)  # (1, L + new)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        got = answer_of(text)
        results.append({"key": key, "depth": round(depth, 4), "answer": text.strip(), "correct": got == str(key)})
        lengths.append(ids.shape[1])
        if progress is not None:
            progress(1)
    correct = sum(r["correct"] for r in results)
    return {"accuracy": correct / trials, "correct": correct, "trials": trials, "seq_len": seq_len,
            "prompt_tokens": sum(lengths) / len(lengths), "seed": seed, "results": results}
