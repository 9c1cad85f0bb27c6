"""COCO detection through MMDetection: model wrapper, hook and data (optional extra)."""
