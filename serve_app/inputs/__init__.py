"""Input images of image-to-image and inpainting: read, checked, fitted, sent to the workers.

A request's ``image`` and ``mask`` are data: URLs or https:// URLs of allow-listed hosts
(reading.py, fetching.py). Their bytes are checked and decoded under byte and pixel limits
(decoding.py), fitted to the output size (fitting.py) once per request, and travel to the
workers as raw pixels once per render call, which its jobs name by digest (pixels.py).
Uploaded files (multipart forms) take the same checks through ``read_uploaded``; a mask in
OpenAI's convention (transparent is repainted) becomes this service's (masks.py).
"""
