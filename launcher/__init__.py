"""The per-node agent: supervises one node's workers and records what the job does."""
