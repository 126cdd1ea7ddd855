"""Training: optimisation steps, evaluation in bits per character."""
