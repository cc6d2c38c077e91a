"""Collective times: ring algorithms over the link a group's ranks share.

Ranks are ordered as Megatron-core's default (tp-cp-ep-dp-pp): TP neighbours are adjacent,
CP strides TP, DP strides TP x CP, PP strides the rest. A group whose span (stride x size)
stays inside the NVLink domain runs at NVLink speed; one that leaves it runs at the NIC's
(each GPU has its own NIC on DGX-style nodes, so a ring across nodes moves at one NIC's rate).
Bus bandwidth = link x collective_fraction (nccl-tests' measured ratio).
"""
from __future__ import annotations

from .hardware import Hardware


def nvlink_span(hw: Hardware, gpus_per_node: int) -> int:
    """GPUs one NVLink domain holds: the node, or a rack for NVL72-style systems."""
    return hw.nvlink_domain if hw.nvlink_domain > 8 else min(gpus_per_node, hw.nvlink_domain)


def link(hw: Hardware, size: int, stride: int, gpus_per_node: int) -> tuple[float, float]:
    """(bytes/s, latency per ring step) of a group of ``size`` ranks ``stride`` apart."""
    if stride * size <= nvlink_span(hw, gpus_per_node):
        return hw.nvlink_bytes_s * hw.collective_fraction, hw.latency_s["nvlink"]
    return hw.network_bytes_s * hw.collective_fraction, hw.latency_s["network"]


def reduce_scatter(nbytes: float, size: int, stride: int, hw: Hardware, gpn: int) -> float:
    """Reduce-scatter (or all-gather) of a tensor of ``nbytes`` (the whole, unsharded)."""
    if size <= 1 or nbytes <= 0:
        return 0.0
    bw, lat = link(hw, size, stride, gpn)
    return (size - 1) / size * nbytes / bw + (size - 1) * lat


all_gather = reduce_scatter


def all_reduce(nbytes: float, size: int, stride: int, hw: Hardware, gpn: int) -> float:
    return 2 * reduce_scatter(nbytes, size, stride, hw, gpn)


def all_to_all(nbytes: float, size: int, stride: int, hw: Hardware, gpn: int) -> float:
    """Each rank sends ``nbytes`` in all, (size-1)/size of it to others."""
    return reduce_scatter(nbytes, size, stride, hw, gpn)


def p2p(nbytes: float, stride: int, hw: Hardware, gpn: int) -> float:
    bw, lat = link(hw, 2, stride, gpn)
    return nbytes / bw + lat
