"""The runtime every aimass process shares: config, server bootstrap, interceptors, batching, discovery."""
