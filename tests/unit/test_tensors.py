"""`to_device`: nested inputs moved as a whole; copies are ordinary tensors; shared tensors move once."""
from __future__ import annotations

import torch

from sparsify.tensors import to_device


def test_nested_structure_and_non_tensors_pass_through():
    x, m = torch.ones(2), torch.zeros(3)
    out = to_device(((x, None), {"mask": m, "n": 3}, [x]), "cpu")
    assert isinstance(out, tuple) and isinstance(out[2], list) and out[0][1] is None and out[1]["n"] == 3
    assert out[0][0] is x  # nothing to move, no copy


def test_clone_gives_autograd_usable_copies_and_memo_shares_them():
    with torch.inference_mode():
        rope = torch.ones(4)
    memo: dict = {}
    a = to_device({"cos": rope}, "cpu", memo, clone=True)
    b = to_device((rope,), "cpu", memo, clone=True)
    assert a["cos"] is b[0] and a["cos"] is not rope and not a["cos"].is_inference()
    w = torch.ones(4, requires_grad=True)
    (w * a["cos"]).sum().backward()  # an inference tensor here would fail: it cannot be saved for backward
    assert torch.equal(w.grad, torch.ones(4))
