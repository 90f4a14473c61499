"""CPU kernels of the packed linear: `paths` (the implementations and the measured table that picks one),
`native` (our C kernel for 2:4 weights, `nm24.c`, built on first use; as a custom op for `torch.compile`
in `sparsify.kernels.ops`), `note` (the one-line note on layers without a fast CPU path).
"""
