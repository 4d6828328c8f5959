"""Rate limits per window for Envoy's rate-limit service API, in envoyproxy/ratelimit's config format."""
