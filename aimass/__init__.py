"""aimass: AI models as a service over one gRPC mesh."""

__version__ = "0.1.0"
