"""The OpenAI-compatible REST front door: an adapter over the aimass.v1 gRPC API, called through the gateway with
each caller's own key (as vLLM's entrypoints sit over its engine). See gateway/rest/app.py for the app, the process
and where routers are included."""
