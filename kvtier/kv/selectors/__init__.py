"""Selectors: one file per token-eviction / selection method, registered by name on import."""

from kvtier.kv.selectors.alisa import Alisa
from kvtier.kv.selectors.base import Selector
from kvtier.kv.selectors.compresskv import CompressKV
from kvtier.kv.selectors.elastic import Elastic
from kvtier.kv.selectors.h2o import H2O
from kvtier.kv.selectors.nosa import Nosa
from kvtier.kv.selectors.quest import Quest
from kvtier.kv.selectors.snapkv import SnapKV
from kvtier.kv.selectors.tova import Tova
from kvtier.kv.selectors.window import Window

__all__ = ["H2O", "Alisa", "CompressKV", "Elastic", "Nosa", "Quest", "Selector", "SnapKV", "Tova", "Window"]
