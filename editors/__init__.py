"""How a correction becomes a weight change: MEND, a fine-tuning baseline, and no-op."""
