"""Tenancy in one place: API keys and their scopes (keys), per-tenant quotas and LLM token accounting (quotas), fair
share of replicas' service (fair_share, VTC), and the audit log (audit). The gateway's auth interceptor
(gateway/auth.py) and AdminService (gateway/admin.py) use them over the store (aimass.store); replicas and the
scheduler use fair_share and quotas."""
