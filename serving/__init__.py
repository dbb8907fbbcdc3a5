"""Autoscaled inference endpoints. `policy` (pure: how many replicas an endpoint wants)."""
