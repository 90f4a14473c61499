"""Sparse attention at decode time: Double Sparsity (offline channel calibration + token selection).

`double_sparsity` (options, channel calibration), `ds_runtime` (the attention function and its
install on a model), `ds_select` (``--ds-statistic auto``), `accounting` (KV bytes read per token),
`artifact` (the prune pipeline's side and the artifact's tensors / manifest section).
"""
