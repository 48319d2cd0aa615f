"""Analysis, rewrites, planning, lowering, tuning, caching and the CLI."""
