"""fspo-ray: few-shot preference optimization (FSPO) on Ray."""
