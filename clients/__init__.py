"""pagefusion's Python client library, CLI and test harness."""
