"""Data → episodes → prompts → tokens: everything the model sees."""
