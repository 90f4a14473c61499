"""Test setup. TRITON_INTERPRET must be set before triton is first imported (ENV.md)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny_models.py importable as `tiny_models`

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _shared_model_cache(tmp_path_factory):
    """One converted SmolLM2 per test session (the conversion takes ~30 s), never the user's cache."""
    if "SPARSIFY_TEST_CACHE" in os.environ:  # reuse across runs when a developer asks for it
        os.environ["SPARSIFY_CACHE"] = os.environ["SPARSIFY_TEST_CACHE"]
    else:
        os.environ["SPARSIFY_CACHE"] = str(tmp_path_factory.mktemp("sparsify-cache"))
    yield
