"""Weight quantizers (int8, int4, fp8) and the joint prune + quantize hook. See `spec` and `rtn`."""
