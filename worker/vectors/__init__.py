"""Vectors per tenant and collection in PostgreSQL with pgvector (store.py), texts embedded by a small model that
ships inside its package (embed.py), and the tables' optional migrations (schema.py)."""
