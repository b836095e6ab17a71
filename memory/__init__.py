"""Persistent stores: the activation cache (and, later, feature memory and run store)."""
