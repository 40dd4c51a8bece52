"""Jinja2 templates per language, shipped as package data (gateway.templates)."""
