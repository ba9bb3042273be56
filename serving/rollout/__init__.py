"""Controlled rollout of a new model version: a candidate beside the serving version, traffic
moved to it in steps, live gates per step, automatic promotion or rollback.

Layers: `spec` (what the user asks: steps, hold, gates), `signals` (Prometheus text -> per-variant
counters and histograms, deltas, p95), `decide` (the state machine: plain data in, a Decision
out), `store` (the state file and the audit trail), `controller` (the loop, with the stack
injected), `stack` (the only Ray-touching part) and `cli` (`keel rollout ...`).
"""
