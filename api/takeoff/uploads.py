"""The image parts of Takeoff's image routes: the multipart body of
/image_generate* (`image_data` file parts + a `json_data` payload) and the
`image_paths` of a payload, each checked and canonicalised by api.images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flask import Request

from api.errors import ImageTooLarge, InvalidImage, InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from api.images import (
    CanonicalImage,
    canonical_image,
    check_image_count,
    fetch_remote_image,
    is_remote,
    read_local_image,
)
from api.payloads import parse_json, validate_payload
from shared.payload import GenerateRequest
from shared.settings import ApiSettings

IMAGE_PART = "image_data"
JSON_PART = "json_data"


@dataclass(frozen=True)
class ImageUpload:
    """A multipart /image_generate body, checked."""

    payload: GenerateRequest
    images: list[CanonicalImage]


def read_upload(request: Request, settings: ApiSettings) -> ImageUpload:
    """The payload and image(s) of a multipart/form-data body with parts
    `image_data` (a file part; several are taken in order) and `json_data`
    (a plain field, or a file part such as the Takeoff client's application/json one)."""
    limit = settings.body_size_limit_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the body is {request.content_length} bytes; the limit is {limit}")
    if request.mimetype != "multipart/form-data":
        raise UnsupportedMediaType(
            "expected Content-Type multipart/form-data with parts image_data (the image file) and "
            f"json_data (the JSON payload), got {request.mimetype or 'none'}"
        )
    # Parsing stops at MAX_CONTENT_LENGTH (413); create_app lifts Flask's
    # 500 kB MAX_FORM_MEMORY_SIZE to the body limit so a large json_data field passes.
    form, files = request.form, request.files

    json_file = files.get(JSON_PART)
    if json_file is not None:
        raw_json: bytes | str = json_file.read(limit + 1)
    elif JSON_PART in form:
        raw_json = form[JSON_PART]
    else:
        raise InvalidRequest(
            f"the multipart body has no '{JSON_PART}' part (the JSON payload)", error_type="missing_part"
        )
    payload = validate_payload(parse_json(raw_json, what=JSON_PART), what=JSON_PART)

    uploads = files.getlist(IMAGE_PART)
    if not uploads:
        if IMAGE_PART in form:
            raise InvalidImage(
                f"'{IMAGE_PART}' must be a file part (with a filename in its Content-Disposition, "
                "as curl -F image_data=@photo.jpg sends it) so its bytes arrive unaltered"
            )
        raise InvalidRequest(
            f"the multipart body has no '{IMAGE_PART}' part (the image file)", error_type="missing_part"
        )
    check_image_count(len(uploads) + len(payload.image_paths or []))
    images = []
    for index, upload in enumerate(uploads):
        source = IMAGE_PART if len(uploads) == 1 else f"{IMAGE_PART} #{index + 1}"
        data = upload.read(limit + 1)
        if len(data) > limit:
            raise ImageTooLarge(f"{source} is over the limit of {limit} bytes")
        images.append(canonical_image(data, max_pixels=settings.max_image_pixels, source=source))
    return ImageUpload(payload=payload, images=images)


def load_image_paths(paths: Sequence[str], settings: ApiSettings) -> list[CanonicalImage]:
    """Read, check and canonicalise each entry of a payload's image_paths, in order."""
    images = []
    for index, path in enumerate(paths):
        source = f"image_paths[{index}]"
        if is_remote(path):
            data = fetch_remote_image(path, settings, source=source)
        else:
            data = read_local_image(path, settings, source=source)
        images.append(canonical_image(data, max_pixels=settings.max_image_pixels, source=source))
    return images
