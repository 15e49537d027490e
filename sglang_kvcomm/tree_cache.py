"""The ``kvcomm`` radix-cache backend: SGLang's RadixCache plus KVCOMM's cross-context reuse.

At this stage it behaves exactly like RadixCache (every method is inherited); it owns the
configuration and the counters that ``/kvcomm/stats`` reports.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache

from radix_anchor.rope import RopeSpec
from sglang_kvcomm.config import KVCommConfig
from sglang_kvcomm.stats import KVCommStats

logger = logging.getLogger(__name__)


class KVCommRadixCache(RadixCache):
    def __init__(self, params: CacheInitParams, config: KVCommConfig, rope: RopeSpec) -> None:
        super().__init__(params)
        self.kvcomm_config = config
        self.kvcomm_rope = rope
        self.kvcomm_stats = KVCommStats()
        logger.info(
            "KVCOMM tree cache: threshold(gamma)=%s max_anchors(V)=%s window(W)=%s page_size=%s "
            "rope=%s/%d",
            config.threshold,
            config.max_anchors,
            config.window,
            self.page_size,
            rope.layout,
            rope.head_dim,
        )

    def kvcomm_report(self) -> dict:
        return {
            "config": asdict(self.kvcomm_config),
            "rope": {"layout": self.kvcomm_rope.layout, "head_dim": self.kvcomm_rope.head_dim},
            **self.kvcomm_stats.as_dict(),
        }
