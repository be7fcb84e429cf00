"""Outbound delivery: signed webhooks when a job ends (deliver.py), their SQL (store.py), and the URL guard every
address a user names passes before Outlast connects to it (ssrf.py)."""
