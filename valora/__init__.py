"""valora: serve multimodal models with many LoRA adapters at once."""

from valora.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> object:
    # Lazy so that ``import valora`` stays light (control-plane tests import no model code).
    if name == "LLM":
        from valora.engine.llm import LLM

        return LLM
    raise AttributeError(name)
