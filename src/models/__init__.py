"""Encoders (timm backbones) and the helpers to feed, save, load and embed with them."""
