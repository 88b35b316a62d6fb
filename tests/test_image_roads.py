"""One road for every image: the same awkward files give the same pixel_values (or the same error) whether
they reach the model through training, the processor, the pipeline, the API or ``phiclip chat``, and the
picture the model gets is the right one (upright, transparency on white, padded with the mean colour)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from processing_phiclip import ImageError, PhiClipProcessor, open_image, prepare_image

EXIF_ORIENTATION = 0x0112
# What ImageOps.exif_transpose undoes for each orientation, so a file stored this way is upright once read.
STORED_AS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_270}


def upright(width: int = 60, height: int = 40) -> Image.Image:
    """A picture whose orientation is obvious: red top-left block, blue bottom band, noise elsewhere."""
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(90, 160, (height, width, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, width // 3, height // 3], fill=(230, 20, 20))
    draw.rectangle([0, height - height // 5, width, height], fill=(20, 20, 230))
    return image


def awkward_files(folder: Path) -> dict[str, Path]:
    """Every PIL mode people send, EXIF orientations 2-8, odd shapes, an animation, and a truncated JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    base = upright()
    files: dict[str, Path] = {}

    def save(name: str, image: Image.Image, **kwargs) -> None:
        files[name] = folder / name
        image.save(files[name], **kwargs)

    save("rgb.png", base)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.where(np.arange(60) < 30, 0, 255), (40, 1)).astype(np.uint8)))
    save("rgba-half-transparent.png", rgba)
    save("la.png", base.convert("LA"))
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    save("p-transparency.png", palette, transparency=0)
    save("p.gif", base.convert("P"))
    save("l.png", base.convert("L"))
    save("1.png", base.convert("1"))
    save("i16.png", Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257)))
    save("i32.tif", Image.fromarray(np.asarray(base.convert("L"), dtype=np.int32) * 257))  # 16-bit data in mode I
    save("f.tif", Image.fromarray(np.asarray(base.convert("L"), dtype=np.float32) / 7.0))
    save("cmyk.jpg", base.convert("CMYK"), quality=95)
    for k, method in STORED_AS.items():
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = k
        save(f"exif{k}.png", base.transpose(method), exif=exif)
    save("panorama.png", base.resize((160, 40)))
    save("strip.png", Image.new("RGB", (1, 1000), (10, 200, 10)))
    save("dot.png", Image.new("RGB", (1, 1), (200, 10, 10)))
    frames = [Image.new("RGB", (30, 30), (250, 0, 0)), Image.new("RGB", (30, 30), (0, 0, 250))]
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=100)
    full = folder / "full.jpg"
    base.resize((200, 200)).save(full, quality=90)
    files["truncated.jpg"] = folder / "truncated.jpg"
    files["truncated.jpg"].write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    return files


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return awkward_files(tmp_path_factory.mktemp("awkward"))


@pytest.fixture(scope="module")
def processor(tiny_run) -> PhiClipProcessor:
    return PhiClipProcessor.from_pretrained(tiny_run / "model")


# ---- the right picture -------------------------------------------------------------------------


@pytest.mark.parametrize("k", sorted(STORED_AS))
def test_exif_orientation_is_applied(files, k):
    reference = np.asarray(upright(), dtype=np.float64)
    got = np.asarray(prepare_image(open_image(files[f"exif{k}.png"]), "crop"), dtype=np.float64)
    stored = np.asarray(Image.open(files[f"exif{k}.png"]).convert("RGB"), dtype=np.float64)
    assert got.shape == reference.shape and np.abs(got - reference).max() == 0
    if stored.shape == reference.shape:  # a flip keeps the shape: make sure the file itself was not upright
        assert np.abs(stored - reference).mean() > 20


def test_transparency_is_white_and_padding_is_the_mean_colour(files, processor):
    rgba = prepare_image(open_image(files["rgba-half-transparent.png"]), "crop")
    assert np.all(np.asarray(rgba)[:, :30] == 255)  # before: the colours hidden under alpha 0 came through
    assert np.array_equal(np.asarray(rgba)[:, 30:], np.asarray(upright())[:, 30:])
    padded = np.asarray(prepare_image(open_image(files["panorama.png"]), "pad", fill=processor.pad_colour))
    assert padded.shape == (160, 160, 3)
    assert np.all(padded[:60] == processor.pad_colour) and np.all(padded[100:] == processor.pad_colour)
    assert processor.pad_colour == tuple(int(x * 255) for x in processor.image_processor.image_mean)


def test_odd_shapes_frames_and_bit_depths(files):
    strip = np.asarray(prepare_image(open_image(files["strip.png"]), "pad", fill=(1, 2, 3)))
    assert strip.shape == (1000, 1000, 3)
    assert np.all(strip[:, 499] == (10, 200, 10)) and np.all(strip[:, 498] == (1, 2, 3))
    assert prepare_image(open_image(files["dot.png"]), "pad").size == (1, 1)
    assert prepare_image(open_image(files["animated.gif"]), "crop").getpixel((5, 5)) == (250, 0, 0)
    grey = np.asarray(upright().convert("L"), dtype=np.int64)
    for name in ("i16.png", "i32.tif"):
        got = np.asarray(prepare_image(open_image(files[name]), "crop"), dtype=np.int64)[..., 0]
        assert np.abs(got - grey).max() <= 1, name  # scaled from 16/32 bit, not clipped to white
    stretched = np.asarray(prepare_image(open_image(files["f.tif"]), "crop"))
    assert stretched.min() == 0 and stretched.max() == 255


def test_truncated_and_garbage_are_named(files, tmp_path):
    with pytest.raises(ImageError, match=r"unreadable image: .*truncated\.jpg: image file is truncated"):
        prepare_image(open_image(files["truncated.jpg"]))
    with pytest.raises(ImageError, match=r"unreadable image: .*truncated\.jpg: image file is truncated"):
        prepare_image(open_image(Image.open(files["truncated.jpg"])))
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(ImageError, match="unreadable image: .*notes.png: not an image"):
        open_image(tmp_path / "notes.png")
    with pytest.raises(ImageError, match="missing image"):
        open_image(str(tmp_path / "nowhere.png"))


def test_sources_a_user_may_hold_all_give_the_same_picture(files):
    data = files["exif6.png"].read_bytes()
    b64 = base64.b64encode(data).decode()
    sources = [files["exif6.png"], str(files["exif6.png"]), data, b64, b64.rstrip("="),
               "data:image/jpeg;base64," + b64,  # a mislabelled MIME type still decodes
               "data:image/png;base64," + "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76)),
               "data:image/png;base64," + base64.urlsafe_b64encode(data).decode(),
               {"bytes": data, "path": None}, Image.open(files["exif6.png"])]
    reference = np.asarray(prepare_image(open_image(files["exif6.png"])))
    for source in sources:
        assert np.array_equal(np.asarray(prepare_image(open_image(source))), reference), type(source)


def test_old_folders_keep_centre_crop(tiny_run, tmp_path):
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(tiny_run / "model", folder)
    config = json.loads((folder / "processor_config.json").read_text())
    assert config["image_aspect"] == "pad"
    for key in ("image_aspect", "image_background", "image_exif_transpose"):
        config.pop(key)
    (folder / "processor_config.json").write_text(json.dumps(config))
    assert PhiClipProcessor.from_pretrained(folder).image_aspect == "crop"


# ---- every road, the same pixel values -----------------------------------------------------------

ROAD_FILES = [name for name in ("rgb.png", "rgba-half-transparent.png", "la.png", "p-transparency.png", "p.gif",
                                "l.png", "1.png", "i16.png", "i32.tif", "f.tif", "cmyk.jpg", "panorama.png",
                                "strip.png", "dot.png", "animated.gif", "truncated.jpg")] + [
    f"exif{k}.png" for k in sorted(STORED_AS)]
QUESTION = "What is in the picture?"


class Captured(Exception):
    """Raised by the stand-in generate(): the pixel values a road handed to the model."""

    def __init__(self, pixel_values):
        super().__init__("captured")
        self.pixel_values = pixel_values


def capture_generate(monkeypatch, *classes):
    def generate(self, *args, pixel_values=None, **kwargs):
        raise Captured(pixel_values)

    for cls in classes:
        monkeypatch.setattr(cls, "generate", generate)


def through_dataset(processor, path: Path) -> torch.Tensor:
    from data.dataset import LlavaDataset
    from data.images import ImageResolver
    from data.records import Record, Report, Turn

    record = Record("r", [Turn("user", f"<image>\n{QUESTION}"), Turn("assistant", "A picture.")], images=[path.name])
    report = Report()
    dataset = LlavaDataset([record], processor=processor, resolver=ImageResolver(path.parent), n_image_tokens=16,
                           max_length=256, report=report)
    try:
        return dataset[0]["pixel_values"]
    except RuntimeError:  # every example's image failed: the report says why
        raise ImageError(report.problems[-1].reason) from None


def through_processor(processor, path: Path) -> torch.Tensor:
    return processor(images=Image.open(path), text=QUESTION, return_tensors="pt")["pixel_values"]


def through_pipeline(pipe, path: Path) -> torch.Tensor:
    messages = [{"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": QUESTION}]}]
    try:
        pipe(text=messages, generate_kwargs={"max_new_tokens": 2})
    except Captured as captured:
        return captured.pixel_values
    raise AssertionError("generate was not called")


def through_api(chat, path: Path) -> torch.Tensor:
    from serve.errors import ServeError
    from serve.inputs import Limits
    from serve.schema import parse_chat

    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()  # PNG label on purpose
    body = {"model": "phiclip", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}]}
    try:
        job = parse_chat(body, ["phiclip"], Limits(), None).job
    except ServeError as err:
        raise ImageError(err.message) from err
    return chat.model_inputs([job.messages], [job.images])["pixel_values"]


def through_cli(run: Path, path: Path, capsys) -> torch.Tensor:
    import phiclip_cli

    try:
        code = phiclip_cli.main(["chat", str(run), "--image", str(path), QUESTION])
    except Captured as captured:
        return captured.pixel_values
    raise ImageError(capsys.readouterr().err) if code else AssertionError("generate was not called")


def test_every_road_gives_the_same_pixels(tiny_run, files, processor, monkeypatch, capsys):
    from transformers import pipeline

    from chat.assistant import VisionChat
    from modeling_phiclip import PhiClipForCausalLM

    pipe = pipeline("image-text-to-text", model=str(tiny_run / "model"), trust_remote_code=True)
    chat = VisionChat.load(tiny_run)
    capture_generate(monkeypatch, PhiClipForCausalLM, type(pipe.model))
    roads = {
        "dataset": lambda p: through_dataset(processor, p),
        "processor": lambda p: through_processor(processor, p),
        "pipeline": lambda p: through_pipeline(pipe, p),
        "api": lambda p: through_api(chat, p),
        "chat": lambda p: through_cli(tiny_run, p, capsys),
    }
    for name in ROAD_FILES:
        results = {}
        for road, run in roads.items():
            try:
                results[road] = run(files[name])
            except (ImageError, ValueError, OSError) as err:
                results[road] = err
        if name == "truncated.jpg":
            for road, result in results.items():
                assert isinstance(result, Exception) and "truncated" in str(result), (road, result)
            continue
        reference = results["dataset"]
        assert isinstance(reference, torch.Tensor), (name, reference)
        reference = reference.reshape(1, *reference.shape[-3:])
        for road, result in results.items():
            assert isinstance(result, torch.Tensor), (name, road, result)
            assert torch.equal(result.reshape(1, *result.shape[-3:]).float(), reference.float()), (name, road)
