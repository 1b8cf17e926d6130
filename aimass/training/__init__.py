"""Training tenants' own models: a small head on a frozen backbone (features, head, evaluation, the artifact)."""
