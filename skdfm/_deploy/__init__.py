"""Deployment, torch-free: exported models run by onnxruntime or OpenVINO.

Nothing here imports torch (``tests/test_layout.py`` checks it).
"""
