# Consul for the aimass mesh (docker-compose.yml mounts this into the agent's config folder). The tokens are not
# here: the compose file passes them from AIMASS_CONSUL_TOKEN (CONSUL_LOCAL_CONFIG), so this file holds no secret.

# ACLs on, and anything a token does not allow is refused: an anonymous caller on :8500 can neither read the
# catalogue nor register a fake replica. Every aimass process sends AIMASS_REGISTRY__CONSUL__TOKEN.
acl {
  enabled        = true
  default_policy = "deny"
  # While the servers cannot be reached, keep using the policies already fetched rather than refusing everything.
  down_policy = "extend-cache"
}

# Every aimass process listens with mesh mTLS and registers a gRPC health check with GRPCUseTLS and TLSServerName
# <kind>.aimass.internal: the agent dials it presenting this certificate (role consul, from the mesh CA, which init
# issued into the agent's folder of the mesh-pki volume) and checks the process holds its kind's.
tls {
  defaults {
    ca_file   = "/consul/tls/ca.crt"
    cert_file = "/consul/tls/consul.crt"
    key_file  = "/consul/tls/consul.key"
    # The HTTP API (:8500) stays plaintext for the processes' and the CLI's calls (a token guards it); no agent
    # asks its peers for certificates, and a single dev agent has no peers to verify.
    verify_incoming = false
    verify_outgoing = false
  }
}

# Without this the agent's checks dial with no client certificate, and every mesh listener refuses them.
enable_agent_tls_for_checks = true
