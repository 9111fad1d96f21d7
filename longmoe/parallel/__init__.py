"""Sequence parallelism (TokenRing, KV-ring, Ulysses): see the TokenRing issue; nothing public yet."""
