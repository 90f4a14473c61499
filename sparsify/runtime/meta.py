"""Build a model skeleton whose parameters are on the meta device but whose buffers are real.

Non-persistent buffers (rotary ``inv_freq``, BERT ``position_ids``) are not in checkpoints and must be
computed at construction; parameters are replaced by `load_state_dict(assign=True)`, so allocating
and initialising them would only cost time and double the memory.
"""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn


@contextmanager
def params_on_meta():
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)  # init then touches meta only

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_on_meta(config, auto_class: str, dtype, trust_remote_code: bool = False):
    """A model of ``config`` built by transformers' ``auto_class`` (or the checkpoint's own class) in
    ``dtype``, parameters on meta, buffers computed. ``from_config`` / ``_from_config`` build in
    ``dtype`` but keep float32 buffers (rotary inv_freq), which ``.to(dtype)`` would not."""
    import transformers

    cls = getattr(transformers, auto_class)
    extra = {"trust_remote_code": True} if trust_remote_code and hasattr(cls, "from_config") else {}
    with params_on_meta():
        build = getattr(cls, "from_config", None) or getattr(cls, "_from_config", None)
        return build(config, dtype=dtype, **extra) if build else cls(config).to(dtype)


def meta_parameters(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.device.type == "meta"] + [
        n for n, b in model.named_buffers() if b.device.type == "meta"
    ]


def check_loaded(model: nn.Module) -> None:
    left = meta_parameters(model)
    if left:
        raise ValueError(f"{len(left)} tensors were not in the checkpoint, e.g. {left[:3]}")

