"""The pure core: cycles, weights, estimates and decisions.

Nothing in this package imports grpc, protobuf, asyncpg or redis (tests/test_layout.py checks it), so every
rule here is tested with plain values and an injected clock.
"""
