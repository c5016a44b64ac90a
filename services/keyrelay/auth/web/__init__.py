"""The auth service's HTTP side: probes, metrics and the admin's web connect page."""
