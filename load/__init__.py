"""Load and kill-the-leader scenarios with an exactly-once checker (see README)."""
