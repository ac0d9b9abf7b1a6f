"""Harness for real agent processes, shared by the demo, the tests and the benchmarks.

agents.py starts `shardmesh up` as child processes and stops them by pid; report.py holds
what the benchmarks write about a run. Neither imports torch, trio or libp2p: the demo and
the benchmarks drive agents over the control socket only.
"""
