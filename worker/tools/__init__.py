"""The `outlast` command and what only it needs: the CLI (cli.py), the terminal follower of a job (watch.py), and the
embedded PostgreSQL and Valkey of `make run` and the tests (embedded.py). The engine never imports these."""
