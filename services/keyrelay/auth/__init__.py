"""The auth service: PKCE flows, encrypted token store, single-flight refresh."""
