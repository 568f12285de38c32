"""Post-training quantization (placeholder, filled below)."""
