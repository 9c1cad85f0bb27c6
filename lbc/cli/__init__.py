"""Command-line entry points (console scripts ``lbc-train`` and ``lbc-summary``; ``tools/`` wraps them)."""
