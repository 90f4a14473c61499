"""Image-classifier accuracy: class-folder names to class ids, top-k counting."""
from __future__ import annotations

import pytest
import torch

from sparsify.errors import UserError
from sparsify.eval.accuracy import class_ids, topk

ID2LABEL = {0: "tabby cat", 1: "golden_retriever", 2: "Goldfish"}


def test_folders_named_after_labels_map_through_id2label():
    ids, rule = class_ids(["goldfish", "tabby_cat", "golden retriever"], ID2LABEL, 3)
    assert rule == "id2label" and ids == {"goldfish": 2, "tabby_cat": 0, "golden retriever": 1}


def test_other_names_fall_back_to_sorted_folder_order():
    ids, rule = class_ids(["a", "b"], ID2LABEL, 3)
    assert rule == "sorted folders" and ids == {"a": 0, "b": 1}
    with pytest.raises(UserError, match="id2label"):
        class_ids(["a", "b", "c", "d"], ID2LABEL, 3)


def test_topk_counts_rows_whose_target_is_among_the_k_best():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0]])  # (3, 3)
    target = torch.tensor([0, 2, 0])
    assert topk(logits, target, 1) == pytest.approx(1 / 3)
    assert topk(logits, target, 2) == pytest.approx(2 / 3)
    assert topk(logits, target, 5) == 1.0  # k capped at the class count
