"""``ServerSettings``: what the HTTP layer enforces on top of the engine config (frozen,
validated)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from valora.errors import InvalidRequestError


@dataclass(frozen=True)
class ServerSettings:
    """HTTP-side options of ``valora serve``.

    ``served_model_name``: the ``model`` id of the base model (requests name it, an adapter, or
    ``base:adapter``). ``api_keys``: when non-empty every ``/v1`` route needs
    ``Authorization: Bearer <one of them>``. ``cors_allow_origins``: CORS is off when empty.
    ``max_body_bytes``: larger request bodies get 413 before they are parsed.
    ``max_prompt_tokens``: prompts (image tokens included) longer than this get 400; ``None`` leaves
    only the model's context limit. ``default_max_tokens``: output budget when a request sets none.
    ``allowed_local_media_path``: ``file://`` image URLs are accepted only for files under this
    directory (``None`` = refused). ``allow_remote_images``: http(s) image URLs are fetched only
    when set, with ``remote_image_timeout_s`` and the engine's ``max_image_bytes`` as limits.
    ``enable_lora_loading``: turns on ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``.
    ``disconnect_poll_s``: how often a non-streaming request checks whether its client left.
    """

    served_model_name: str = "default"
    api_keys: tuple[str, ...] = ()
    cors_allow_origins: tuple[str, ...] = ()
    max_body_bytes: int = 64 * 1024 * 1024
    max_prompt_tokens: int | None = None
    default_max_tokens: int = 256
    allowed_local_media_path: Path | None = None
    allow_remote_images: bool = False
    remote_image_timeout_s: float = 10.0
    enable_lora_loading: bool = False
    disconnect_poll_s: float = 0.5

    def __post_init__(self) -> None:
        problems = []
        if not self.served_model_name or self.served_model_name != self.served_model_name.strip():
            problems.append("served_model_name must be a non-empty name without surrounding spaces")
        if any(not key for key in self.api_keys):
            problems.append("api keys must be non-empty strings")
        if self.max_body_bytes <= 0:
            problems.append("max_body_bytes must be positive")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens <= 0:
            problems.append("max_prompt_tokens must be positive")
        if self.default_max_tokens <= 0:
            problems.append("default_max_tokens must be positive")
        if self.remote_image_timeout_s <= 0 or self.disconnect_poll_s <= 0:
            problems.append("timeouts must be positive")
        if self.allowed_local_media_path is not None:
            path = Path(self.allowed_local_media_path).expanduser().resolve()
            if not path.is_dir():
                problems.append(f"allowed_local_media_path {str(path)!r} is not a directory")
            object.__setattr__(self, "allowed_local_media_path", path)
        if problems:
            raise InvalidRequestError("; ".join(problems))
