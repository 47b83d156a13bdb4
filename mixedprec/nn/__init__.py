from mixedprec.nn.packed_conv import PackedConv2d  # noqa: F401
