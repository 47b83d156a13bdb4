"""PackedModule: what PackedLinear and PackedConv2d share about holding a packed weight."""
from __future__ import annotations

from torch import nn

from mixedprec.formats import PackedWeight

PACKED_BUFFERS = ("codebook", "channel_scale", "codes", "keep_bitmap")
DERIVED_BUFFERS = ("code_offsets",)  # formats.PackedWeight's index, rebuilt on load, never saved
# Derived tables of earlier versions, named in the module trees of files they saved: dropped on load.
_FORMER_DERIVED_BUFFERS = ("row_code_offsets", "group_code_offsets")


class PackedModule(nn.Module):
    """A layer whose weight is a PackedWeight held in buffers (``PACKED_BUFFERS``, plus tables
    derived from them that a subclass lists in ``derived_buffers``).

    The buffers move with the module (``.to(device)``, ``.cuda()``), but a cast of the module
    (``.to(torch.float64)``, ``.half()``, ``.double()``) leaves their dtypes as the format fixes
    them: a cast would break the format (float16 or float32 codebook, uint8 codes) and, for float32 scales,
    lose bits. ``load_state_dict`` validates the loaded buffers and rebuilds the derived tables.
    """

    derived_buffers: tuple[str, ...] = DERIVED_BUFFERS

    def packed_weight(self) -> PackedWeight:
        """The weight as a (validated) PackedWeight."""
        raise NotImplementedError

    def _set_packed(self, packed: PackedWeight) -> None:
        for name in PACKED_BUFFERS:
            self.register_buffer(name, getattr(packed, name))
        for name in self.derived_buffers:  # recomputed from the others on load, never saved
            self.register_buffer(name, getattr(packed, name), persistent=False)
        for name in _FORMER_DERIVED_BUFFERS:
            self._buffers.pop(name, None)
            self._non_persistent_buffers_set.discard(name)

    def rebuild_derived(self) -> None:
        """Validates the packed buffers and recomputes the derived tables (after loading): the
        kernels trust their sizes."""
        self._set_packed(self.packed_weight())

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
