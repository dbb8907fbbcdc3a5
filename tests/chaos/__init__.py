"""The chaos suite: a seeded schedule of faults injected into a real elastic training job."""
