"""Training code for both model stages."""
