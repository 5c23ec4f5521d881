"""What the OpenAPI document says about the API: response models, the error responses and
the multipart request bodies (read by hand, so described here rather than inferred)."""

from pydantic import BaseModel


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class Prediction(BaseModel):
    filename: str
    format: str
    width: int
    height: int
    predicted: str
    probability: float
    probabilities: dict[str, float]


class PredictResponse(BaseModel):
    model_id: str
    engine: str
    class_names: list[str]
    threshold: float | None
    positive_class: str | None
    decision: str
    predictions: list[Prediction]


ERROR_RESPONSES = {s: {"model": ErrorResponse, "description": d} for s, d in (
    (400, "no file, empty file or malformed multipart body"), (401, "missing or wrong API key"),
    (413, "file, request or pixel count over the limit"), (415, "not a supported image type / not multipart"),
    (422, "truncated or corrupt image"),
)}


def multipart_doc(many: bool, extra: dict | None = None) -> dict:
    """``openapi_extra`` for a route that reads images from multipart field ``file``."""
    file_schema = {"type": "string", "format": "binary"}
    props = {"file": {"type": "array", "items": file_schema} if many else file_schema}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {"type": "object", "properties": {**props, **(extra or {})}, "required": ["file"]}}}}}
