"""An LRU of prefilled prefixes, so one image's KV serves every rollout, stage and repeated query.

The key holds the weights variant and the prompt's identity, images by content hash and prepared size:
a new image, another resolution or the LoRA-merged weights never reuse stale KV.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from runtimes.protocol import Prefix, Runtime, Segment, segments_key


class PrefixCache:
    def __init__(self, runtime: Runtime, capacity: int) -> None:
        self.runtime = runtime
        self.capacity = capacity
        self._entries: OrderedDict[tuple, Prefix] = OrderedDict()

    def get(self, segments: Sequence[Segment], variant: str) -> tuple[Prefix, bool]:
        """Returns (prefix, fresh): fresh is True when it was computed by this call."""
        key = (variant, segments_key(segments))
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key], False
        prefix = self.runtime.prefill(segments, variant)
        if self.capacity > 0:
            self._entries[key] = prefix
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return prefix, True
