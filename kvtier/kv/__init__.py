"""The KV store: fixed-size blocks per sequence and layer, encoded by a codec."""

from kvtier.kv.cache import LayerKV, Part, SeqKV

__all__ = ["LayerKV", "Part", "SeqKV"]
