"""The servers under test: three baselines (modules here) and compute-api itself."""
