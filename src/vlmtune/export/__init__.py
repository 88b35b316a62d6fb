"""Export a run as a standard Hugging Face Llava checkpoint (transformers, vLLM, lmms-eval)."""

from vlmtune.export.checkpoint import ExportError, check_exportable, export_run
from vlmtune.export.template import wrap_chat_template

__all__ = ["ExportError", "check_exportable", "export_run", "wrap_chat_template"]
