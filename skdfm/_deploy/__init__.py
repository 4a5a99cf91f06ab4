"""Deployment, torch-free: exported models run by onnxruntime or OpenVINO.

Nothing here imports torch, timm, scikit-learn, scipy or the onnx package
(``tests/test_layout.py`` checks it): skdfm-runtime, the distribution
``tools/build_runtime_wheel.py`` builds, installs only numpy, Pillow and a runtime.
"""
