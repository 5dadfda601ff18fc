"""The Gradio app and the `weightsmith` CLI, built on the same functions (jobs, registry)."""
