"""What the OpenAPI document says about the API: response models, the error responses and
the multipart request bodies (read by hand, so described here rather than inferred)."""

from pydantic import BaseModel, Field

from imgclf.serve.uploads import SUPPORTED_TYPES


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class SimilarCase(BaseModel):
    """A training image near the uploaded one in the model's feature space."""

    index: int = Field(description="the case's row in the model's similar-cases index")
    label: str = Field(description="its class")
    similarity: float = Field(description="cosine similarity of the backbone features, -1..1")
    path: str | None = Field(description="its path when the model was trained; null unless the server runs with --neighbor-paths")
    thumbnail_url: str | None = Field(description="GET it for a small JPEG of the case; null when none was stored")


class Prediction(BaseModel):
    filename: str
    format: str
    width: int
    height: int
    predicted: str
    probability: float
    probabilities: dict[str, float]
    neighbors: list[SimilarCase] | None = Field(None, description="the most similar training images, best first; null unless asked for with ?neighbors=K")


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
    (422, "truncated or corrupt image, or an invalid query parameter"),
)}


def multipart_doc(many: bool, extra: dict | None = None, *, max_files: int = 1) -> dict:
    """``openapi_extra`` for a route that reads images from multipart field ``file``: one image,
    or (``many``) 1 to ``max_files`` of them, as the server enforces."""
    file_schema = {"type": "string", "format": "binary", "description": f"image file ({SUPPORTED_TYPES}; the type is read from the content)"}
    props = {"file": {"type": "array", "items": file_schema, "minItems": 1, "maxItems": max_files} if many else file_schema}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {"type": "object", "properties": {**props, **(extra or {})}, "required": ["file"]}}}}}
