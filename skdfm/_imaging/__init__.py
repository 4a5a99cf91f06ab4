"""Images in, features out.

Decoding (torch-free), input rules, timm backbones, feature layouts.
"""
