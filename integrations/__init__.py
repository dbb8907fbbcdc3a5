"""Integrations with training frameworks and cluster systems; each imports its library lazily."""
