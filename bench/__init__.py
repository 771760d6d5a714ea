"""Side-by-side benchmarks: PostgreSQL directly vs PgBouncer vs Shardgate (run with `python -m bench.run`)."""
