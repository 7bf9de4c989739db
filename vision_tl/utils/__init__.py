"""Small shared helpers (atomic files)."""
