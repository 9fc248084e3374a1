"""Collective communication: Gloo and NCCL process groups and parallel strategies (arrives with the collectives issue)."""
