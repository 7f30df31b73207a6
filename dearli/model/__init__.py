"""The M2F-Lang model: frozen OpenCLIP ConvNeXt backbone, Mask2Former decoder, CLIP text classifier."""
