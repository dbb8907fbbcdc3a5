"""Ray integration: the cluster scheduler (`scheduler`, pure) and, on top of it, its Ray binding."""
