"""Guest memory adapters (plugins discovered through `pagefusion.adapters`)."""
