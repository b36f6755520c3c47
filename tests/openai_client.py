"""Drives `elastic-edge serve` with the official `openai` client (tests/openai.rs
runs it with .cache/venv-openai's Python). Usage:

    openai_client.py BASE_URL API_KEY PNG_PATH JPEG_PATH MODEL

Checks a plain and a streamed request with an image, a JPEG, a multi-turn
conversation, /v1/models, and the errors a client sees (a bad image, an
image URL, an oversized body, a wrong key). Prints one line per check and a
last line `all checks passed`; any failure raises (non-zero exit).
"""

import base64
import sys

import openai


def data_url(path, mime):
    with open(path, "rb") as f:
        return "data:%s;base64,%s" % (mime, base64.b64encode(f.read()).decode())


def user(text, url=None):
    parts = [{"type": "text", "text": text}]
    if url is not None:
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return {"role": "user", "content": parts}


def expect_error(kind, status, call):
    try:
        call()
    except kind as e:
        assert e.status_code == status, (e.status_code, e)
        body = e.body if isinstance(e.body, dict) else {}
        # The client hands over the `error` object.
        assert "message" in body and "type" in body, body
        return body
    raise AssertionError("no %s (%d)" % (kind.__name__, status))


def main():
    base_url, key, png, jpeg, model = sys.argv[1:6]
    # No retries: a 4xx or 5xx must reach the test as it came.
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)
    png_url = data_url(png, "image/png")

    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == [model], ids
    print("models:", ids)

    plain = client.chat.completions.create(
        model=model,
        messages=[user("What is in the picture?", png_url)],
        max_tokens=8,
    )
    choice = plain.choices[0]
    assert plain.object == "chat.completion", plain
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str), choice
    assert choice.finish_reason in ("stop", "length"), choice
    assert 0 < plain.usage.completion_tokens <= 8, plain.usage
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    extra = plain.model_extra["elastic_edge"]
    assert extra["policy"] == "elastic" and extra["keep"] == 0.5, extra
    print("plain:", repr(choice.message.content), plain.usage.completion_tokens, "tokens", choice.finish_reason)

    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=[user("What is in the picture?", png_url)],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks), chunks
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    # Greedy: the same picture and question give the same answer.
    assert text == choice.message.content, (text, choice.message.content)
    assert finish == [choice.finish_reason], finish
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    print("streamed:", len(chunks), "chunks, the same text")

    photo = client.chat.completions.create(
        model=model,
        messages=[user("And this one?", data_url(jpeg, "image/jpeg"))],
        max_tokens=4,
    )
    assert photo.usage.completion_tokens > 0, photo
    print("jpeg:", repr(photo.choices[0].message.content))

    conversation = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "You describe pictures."},
            user("What is in the picture?", png_url),
            {"role": "assistant", "content": choice.message.content},
            {"role": "user", "content": "Say it again, shorter."},
        ],
        max_tokens=6,
        temperature=0.8,
        top_p=0.9,
        seed=7,
    )
    # The earlier turns are in the prompt.
    assert conversation.usage.prompt_tokens > plain.usage.prompt_tokens, (conversation.usage, plain.usage)
    again = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "You describe pictures."},
            user("What is in the picture?", png_url),
            {"role": "assistant", "content": choice.message.content},
            {"role": "user", "content": "Say it again, shorter."},
        ],
        max_tokens=6,
        temperature=0.8,
        top_p=0.9,
        seed=7,
    )
    assert again.choices[0].message.content == conversation.choices[0].message.content, "a seed repeats"
    print("conversation:", conversation.usage.prompt_tokens, "prompt tokens")

    bad = expect_error(
        openai.BadRequestError,
        400,
        lambda: client.chat.completions.create(
            model=model, messages=[user("What?", "data:image/png;base64,aGVsbG8gd29ybGQ=")]
        ),
    )
    assert bad["param"] == "messages[0].content[1].image_url.url", bad
    print("bad image:", bad["message"])

    remote = expect_error(
        openai.BadRequestError,
        400,
        lambda: client.chat.completions.create(
            model=model, messages=[user("What?", "https://example.com/cat.png")]
        ),
    )
    assert "offline" in remote["message"], remote
    print("image URL:", remote["message"])

    # Over http.max_body (512 KiB in the test's config).
    huge = "data:image/png;base64," + "A" * (700 * 1024)
    too_large = expect_error(
        openai.APIStatusError,
        413,
        lambda: client.chat.completions.create(model=model, messages=[user("What?", huge)]),
    )
    print("oversized:", too_large["message"])

    wrong = openai.OpenAI(base_url=base_url, api_key=key + "x", max_retries=0, timeout=30)
    denied = expect_error(openai.AuthenticationError, 401, lambda: wrong.models.list())
    assert denied["code"] == "invalid_api_key", denied
    expect_error(
        openai.AuthenticationError,
        401,
        lambda: wrong.chat.completions.create(model=model, messages=[user("hi")]),
    )
    print("wrong key:", denied["message"])

    print("all checks passed")


if __name__ == "__main__":
    main()
