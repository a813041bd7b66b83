"""Serving the configuration the study picks: an OpenAI-compatible API, a Gradio demo, a load test."""
