"""Injection: which modules an adapter targets, and the plan that checks it all before any change."""
