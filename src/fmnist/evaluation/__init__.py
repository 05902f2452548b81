"""Evaluation: the test-set report, temperature scaling with the unsure threshold, pictures."""
