"""Evaluation: held-out users' preference accuracy over shots, and win rates against the base model."""
