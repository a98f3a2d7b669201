"""Tensor parallelism: the context every layer holds (:mod:`.context`: rank, size, collectives, sharding rules) and
the peer-to-peer all-reduce over NVLink (:mod:`.p2p`)."""
from neox_rt.parallel.context import (SINGLE, TensorParallel, check_tp_size, init_from_env, padded_vocab_size,
                                      tp_split_dim)
from neox_rt.parallel.p2p import P2P_HEADER_BYTES, P2P_SLOT_BYTES, P2PAllReduce, p2p_mode, setup_p2p

__all__ = ["SINGLE", "TensorParallel", "check_tp_size", "init_from_env", "padded_vocab_size", "tp_split_dim",
           "P2P_HEADER_BYTES", "P2P_SLOT_BYTES", "P2PAllReduce", "p2p_mode", "setup_p2p"]
