"""Pure tensor and model operations. No gradio, sqlite, or huggingface_hub imports here:
functions take tensors, models or tokenizers and return them; IO lives in the plugins."""
