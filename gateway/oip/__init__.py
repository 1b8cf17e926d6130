"""The Open Inference Protocol v2 (KServe/Triton gRPC) on the gateway port: an adapter over aimass.v1."""
