"""Plumbing every layer uses: atomic file writes, the run environment record, logging set-up, memory."""
