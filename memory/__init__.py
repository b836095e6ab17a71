"""Persistent stores: the activation cache (per-text SAE activations, SQLite) and the
feature memory (feature summaries and verdicts, Chroma or in-memory, searchable by meaning)."""
