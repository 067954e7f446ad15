"""Conan: a Ray-native platform that trains text-embedding LLMs from scratch."""

__version__ = "0.1.0"
