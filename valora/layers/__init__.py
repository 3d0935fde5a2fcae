"""Building blocks of valora's models: LoRA-aware linear, paged attention, RoPE, norms."""
