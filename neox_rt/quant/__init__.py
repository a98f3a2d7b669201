"""Weight-only quantization (issue #24): the weight formats (:mod:`.formats`), quantizing a built model's linears
in place and loading checkpoints layer by layer into quantized linears (:mod:`.apply`), and quantized checkpoints,
ours and GPTQ's, read and written (:mod:`.checkpoint`).

This package imports the ops, model and checkpoints layers, never the reverse, except the op table registering the
kernels that read a format (:mod:`neox_rt.ops.triton` and :mod:`neox_rt.ops.cuda` import :mod:`.formats`, which imports
only torch).
"""
