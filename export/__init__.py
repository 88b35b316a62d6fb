"""Export a run as a standard Hugging Face Llava checkpoint (transformers, vLLM, lmms-eval): see checkpoint.py."""
