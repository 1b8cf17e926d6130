"""aimass.v1.VisionService: ImageNet classification, face detection and OCR."""
