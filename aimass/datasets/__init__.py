"""Tenants' datasets as files: parsing and validation (``parsing``), the held-out split (``split``) and sample data
for tests and benchmarks (``samples``)."""
