"""The bundled face-recognition trainer: `python -m train`."""
