"""What the user touches: `python -m elastic.run` and, later, the worker-side API."""
