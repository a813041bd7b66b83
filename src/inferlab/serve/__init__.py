"""Serving the study's pick: an OpenAI-compatible API, a Gradio demo, a load test."""
