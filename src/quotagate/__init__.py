"""quotagate: monthly token quotas for LLM traffic, decided for Envoy and charged by real usage."""

__version__ = "0.1.0"
__all__ = ["__version__"]
