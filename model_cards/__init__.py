"""Model card templates (Jinja2, rendered by huggingface_hub.ModelCard.from_template)."""
