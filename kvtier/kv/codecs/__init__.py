"""Codecs: one file per compression method, registered by name on import."""

from kvtier.kv.codecs.base import Codec
from kvtier.kv.codecs.bfp import Bfp
from kvtier.kv.codecs.dense import Dense
from kvtier.kv.codecs.intq import Int
from kvtier.kv.codecs.lowrank import LowRank
from kvtier.kv.codecs.mixed import Mixed
from kvtier.kv.codecs.mxfp4 import MxFp4
from kvtier.kv.codecs.mxfp8 import MxFp8
from kvtier.kv.codecs.mxint8 import MxInt8
from kvtier.kv.codecs.nvfp4 import NvFp4
from kvtier.kv.codecs.nuq import Nuq
from kvtier.kv.codecs.nvint4 import NvInt4
from kvtier.kv.codecs.ovp import Ovp
from kvtier.kv.codecs.rotatekv import RotateKV
from kvtier.kv.codecs.sparse import Sparse
from kvtier.kv.codecs.vq import Vq

__all__ = ["Codec", "Dense", "Int", "MxFp4", "MxFp8", "MxInt8", "NvFp4", "NvInt4", "RotateKV"]
__all__ += ["Bfp", "LowRank", "Nuq", "Ovp", "Sparse", "Vq", "Mixed"]
