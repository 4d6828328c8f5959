"""Thin gRPC adapters: each translates protobuf to the service and back, nothing else."""
