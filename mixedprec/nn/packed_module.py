"""PackedModule: what PackedLinear and PackedConv2d share about holding a packed weight."""
from __future__ import annotations

from torch import nn

from mixedprec.formats import PackedWeight
from mixedprec.metrics.compression import FLOAT_BITS
from mixedprec.metrics.report import LayerWeight

PACKED_BUFFERS = ("codebook", "channel_scale", "codes", "keep_bitmap")


class PackedModule(nn.Module):
    """A layer whose weight is a PackedWeight held in buffers (``PACKED_BUFFERS``, plus tables
    derived from them that a subclass lists in ``derived_buffers``).

    The buffers move with the module (``.to(device)``, ``.cuda()``), but a cast of the module
    (``.to(torch.float64)``, ``.half()``, ``.double()``) leaves their dtypes as the format fixes
    them: a cast would break the format (float16 or float32 codebook, uint8 codes) and, for float32 scales,
    lose bits. ``load_state_dict`` validates the loaded buffers and rebuilds the derived tables.
    """

    derived_buffers: tuple[str, ...] = ()
    input_quant: nn.Module | None  # set by the subclass: quantizes the layer's inputs (SBS), or None

    def packed_weight(self) -> PackedWeight:
        """The weight as a (validated) PackedWeight."""
        raise NotImplementedError

    def report_weight(self) -> LayerWeight:
        """For reports (``mixedprec.metrics.report``). The float layer's size is not known here: a
        packed SBS layer's pruned channels are gone; reports take it from a float reference."""
        packed = self.packed_weight()
        a_bits = FLOAT_BITS if self.input_quant is None else self.input_quant.current_bits()
        return LayerWeight("packed", packed.numel, packed.kept, packed.out_channels, packed.bits, a_bits, None,
                           packed.channel_scale.dtype, packed.codebook.dtype)

    def rebuild_derived(self) -> None:
        """Validates the packed buffers and recomputes the derived tables (after loading)."""
        self.packed_weight()

    def _apply(self, fn, recurse=True):
        stored = {name: self._buffers[name] for name in PACKED_BUFFERS + self.derived_buffers
                  if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, before in stored.items():
            after = self._buffers[name]
            if after.dtype != before.dtype:  # a cast: keep the format's dtype, follow the device
                self._buffers[name] = before.to(after.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        loaded = all(prefix + name in state_dict for name in PACKED_BUFFERS if self._buffers.get(name) is not None)
        if len(error_msgs) == errors and loaded:
            try:
                self.rebuild_derived()
            except ValueError as exc:
                error_msgs.append(f"{type(self).__name__} {prefix.rstrip('.') or '<root>'!r}: {exc}")
