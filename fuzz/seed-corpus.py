#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora into fuzz/corpus/<target>/ (git-ignored).

Small pictures of every supported format and layout, made with Pillow (the
project's venv has it: `.cache/venv/bin/python fuzz/seed-corpus.py`), the
repository's tiny fixtures, and short texts for the other parsers. Seeds
only start the search; libFuzzer adds what it finds beside them.
"""
import base64
import io
import json
import pathlib
import shutil

from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"


def picture(width, height, mode="RGB"):
    img = Image.new("RGB", (width, height))
    img.putdata([((x * 37) % 256, (y * 59) % 256, ((x + y) * 23) % 256) for y in range(height) for x in range(width)])
    return img.convert(mode)


def encode(img, fmt, **options):
    out = io.BytesIO()
    img.save(out, fmt, **options)
    return out.getvalue()


def exif_rotated(img):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW
    return encode(img, "JPEG", quality=80, exif=exif.tobytes())


def jpegs():
    rgb = picture(13, 9)
    return {
        "baseline.jpg": encode(rgb, "JPEG", quality=75),
        "progressive.jpg": encode(rgb, "JPEG", quality=75, progressive=True),
        "gray.jpg": encode(picture(8, 8, "L"), "JPEG", quality=90),
        "cmyk.jpg": encode(picture(8, 8, "CMYK"), "JPEG", quality=90),
        "subsampled-420.jpg": encode(picture(17, 11), "JPEG", quality=60, subsampling=2),
        "restart.jpg": encode(picture(16, 16), "JPEG", quality=60, restart_marker_blocks=1),
        "exif-rotated.jpg": exif_rotated(picture(6, 4)),
    }


def images():
    seeds = {
        "rgb.png": encode(picture(7, 5), "PNG"),
        "rgba.png": encode(picture(5, 3, "RGBA"), "PNG"),
        "palette.png": encode(picture(6, 6).convert("P"), "PNG"),
        "gray16.png": encode(picture(4, 4, "I;16"), "PNG"),
        "rgb.bmp": encode(picture(5, 3), "BMP"),
        "rgb.ppm": encode(picture(4, 3), "PPM"),
        "gray.pgm": encode(picture(4, 3, "L"), "PPM"),
        "rgb.gif": encode(picture(5, 4), "GIF"),
        "rgb.tiff": encode(picture(4, 4), "TIFF"),
        "rgb-lossless.webp": encode(picture(4, 4), "WEBP", lossless=True),
        "rgb-lossy.webp": encode(picture(8, 8), "WEBP", quality=50),
        "tall-1x40.png": encode(picture(1, 40), "PNG"),
        "wide-40x1.png": encode(picture(40, 1), "PNG"),
    }
    for path in sorted((ROOT / "tests" / "data" / "resize").glob("*")):
        if path.stat().st_size <= 4096:
            seeds["fixture-" + path.name] = path.read_bytes()
    seeds.update(jpegs())
    return seeds


def ppm_frame(width, height, maxval=255, comment=False):
    header = b"P6\n" + (b"# a comment\n" if comment else b"") + b"%d %d\n%d\n" % (width, height, maxval)
    samples = width * height * 3
    if maxval < 256:
        body = bytes((i * 7) % (maxval + 1) for i in range(samples))
    else:
        body = b"".join(((i * 997) % (maxval + 1)).to_bytes(2, "big") for i in range(samples))
    return header + body


def texts():
    png = encode(picture(3, 2), "PNG")
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    jpeg_url = "data:image/jpeg;base64," + base64.b64encode(jpegs()["baseline.jpg"]).decode()
    chat = [
        {"messages": [{"role": "user", "content": "Describe the picture."}]},
        {
            "model": "demo",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": data_url}},
                ]},
            ],
            "max_tokens": 16,
            "temperature": 0.7,
            "top_p": 0.9,
            "seed": -3,
            "stop": ["\n", "."],
            "stream": True,
            "stream_options": {"include_usage": True},
            "n": 1,
        },
        {"messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": jpeg_url}]},
            {"role": "assistant", "content": "A picture."},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            {"role": "user", "content": "And the colours?"},
        ], "max_completion_tokens": 8},
        {"model": "memory", "messages": [{"role": "user", "content": "What did you see?"}]},
    ]
    config_text = (ROOT / "scripts" / "elastic-edge.toml").read_text()
    return {
        "chat_request": {f"chat-{i}.json": json.dumps(c).encode() for i, c in enumerate(chat)},
        "query": {
            "query-0.txt": b"prompt=What+is%20on%20the%20table%3F&temperature=0.7",
            "query-1.txt": b"stop=%0A&prompt=%C3%A9t%C3%A9&seed=1",
            "query-2.txt": b"x&prompt=&=y&prompt=second",
        },
        "ask_request": {
            "ask-0.json": b'{"question": "What is on the table?"}',
            "ask-1.json": b'{"question": "Who came in?", "max_tokens": 32}',
        },
        "byte_size": {
            f"size-{i}.txt": s.encode()
            for i, s in enumerate(["64MiB", "1.5 GB", "1e9", "65536", "4096tokens", "2.5E+3kB", "1TiB", "512 KiB"])
        },
        "config": {
            "commented.toml": config_text.encode(),
            "minimal.toml": b'[model]\ndir = "models/demo"\n',
            "full.toml": (
                b'[model]\ndir = "m"\ndevice = "cpu"\nthreads = 2\n'
                b'[cache]\nkv_budget = "64MiB"\npolicy = "elastic"\nkeep = 0.5\ndistance = 0.05\nprefill_chunk = 32\n'
                b'[caption]\nprompt = "What is here?"\nmax_new_tokens = 32\n'
                b'[stream]\nsource = "stdin:mjpeg"\ninterval = "1.5s"\nloop = false\njsonl = "captions.jsonl"\n'
                b'[memory]\nenabled = true\ncaptions = true\n'
                b'[http]\nlisten = "[::1]:8080"\nmax_body = "8MiB"\napi_key = "secret-key"\n'
            ),
        },
        "dataset": {
            "lines.jsonl": (
                b'{"id": "a", "kind": "caption", "images": ["pic.png"], "prompt": "Caption it."}\n'
                b'{"image": "pic.png", "prompt": "What colour?", "reference": "red"}\n'
                b'{"kind": "multi-image", "images": ["pic.png", "pic.png"], "prompt": "Compare."}\n'
                b'\n'
                b'{"prompt": "Say hello.", "source": "here"}\r\n'
            ),
            "bad.jsonl": b'{"prompt": ""}\nnot json\n{"images": ["missing.png"], "prompt": "x"}\n\xff\n',
        },
    }


def weights_file(tensors=(("w", "float32", [2, 3]), ("b", "uint8", [5]))):
    """A shared weights file as scripts/export/decoder_v2.py writes it: each tensor at a
    multiple of 64 bytes, then the JSON index, its length (u64 LE) and b"EEWEIGHT"."""
    import struct
    size = {"float32": 4, "uint8": 1}
    data, index = b"", []
    for name, dtype, shape in tensors:
        data += b"\0" * (-len(data) % 64)
        n = size[dtype]
        for d in shape:
            n *= d
        index.append({"name": name, "dtype": dtype, "shape": shape, "offset": len(data), "bytes": n})
        data += bytes(range(n))
    trailer = json.dumps({"tensors": index}).encode()
    return data + trailer + struct.pack("<Q", len(trailer)) + b"EEWEIGHT"


def main():
    if CORPUS.exists():
        shutil.rmtree(CORPUS)
    seeds = texts()
    seeds["image"] = images()
    seeds["image_jpeg"] = jpegs()
    seeds["manifest"] = {"tiny.json": (ROOT / "models" / "tiny" / "manifest.json").read_bytes()}
    manifest = json.loads(seeds["manifest"]["tiny.json"])
    for key in ("vision",):
        manifest.pop(key, None)
        manifest["files"].pop(key, None)
        manifest["graphs"].pop(key, None)
    seeds["manifest"]["tiny-text-only.json"] = json.dumps(manifest).encode()
    # Image splitting (committed), and a dynamic-resolution multimodal-RoPE one made from the tiny
    # model's: the fields the parser checks, whatever the graphs say.
    seeds["manifest"]["tiny-idefics3-split.json"] = (ROOT / "models" / "tiny-idefics3-split" / "manifest.json").read_bytes()
    dynamic = json.loads(seeds["manifest"]["tiny.json"])
    dynamic["mrope_section"] = [2, 3, 3]
    dynamic["vision"].update({"resize": "bicubic_smart_resize", "image_tokens": 48, "dynamic": {
        "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "min_pixels": 3136,
        "max_pixels": 37632}})
    seeds["manifest"]["tiny-dynamic.json"] = json.dumps(dynamic).encode()
    jpeg = jpegs()
    seeds["pipe_mjpeg"] = {
        "two-frames.mjpeg": jpeg["baseline.jpg"] + jpeg["gray.jpg"],
        "garbage-between.mjpeg": jpeg["baseline.jpg"] + b"junk" + jpeg["restart.jpg"],
        "exif.mjpeg": jpeg["exif-rotated.jpg"] + jpeg["progressive.jpg"][:40],
    }
    seeds["pipe_ppm"] = {
        "two-frames.ppm": ppm_frame(3, 2) + b"\n" + ppm_frame(2, 2, comment=True),
        "deep.ppm": ppm_frame(2, 2, maxval=1023) + ppm_frame(1, 1, maxval=15),
    }
    seeds["weights_index"] = {"two-tensors.weights": weights_file(), "empty.weights": weights_file([])}
    total = 0
    for target, files in seeds.items():
        folder = CORPUS / target
        folder.mkdir(parents=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
            total += len(data)
        print(f"{target}: {len(files)} seeds, {sum(map(len, files.values()))} bytes")
    print(f"{total} bytes in {CORPUS}")


if __name__ == "__main__":
    main()
